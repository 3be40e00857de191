"""The train/valid split of a library: duplicates kept once, families kept together, kinds of sound stratified.

- Exact duplicates (the same prepared audio under two names or in two formats) are kept once, the shortest path.
- Files are grouped into families before splitting: takes of one sound (the same name up to a trailing number or
  "copy"/"(1)", in one folder, with the same caption) go to one split; so do the chunks of one long file.
- A family keeps the split it had in the last run (recorded in the preparation state), so adding files never moves
  a file between splits. New families are placed, in the order of a hash of their name (deterministic), so that
  each kind of sound (UCS category, else folder) and the whole dataset come closest to ``--valid-fraction`` of files.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from solvers.data.config import _hash_text
from solvers.data.names import family_key, stratum_of

TRAIN, VALID = 'train', 'valid'


@dataclass
class Family:
    """Files that must share a split, and the kind of sound they are (the stratum)."""

    key: str
    stratum: str
    files: list[str] = field(default_factory=list)
    split: str | None = None

    @property
    def order(self) -> float:
        """Where the family comes in the placement order: a hash of its key, uniform in [0, 1)."""
        return int(_hash_text(self.key, 8), 16) / 2**64


def find_duplicates(pcm_hashes: dict[str, str | None]) -> dict[str, str]:
    """Files whose prepared audio another file already has: ``{duplicate: the file kept}``.

    Of identical files, the one with the shortest path is kept (``Door.wav`` rather than ``Door copy.wav``).
    """
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for rel in sorted(pcm_hashes, key=lambda r: (len(r), r)):
        digest = pcm_hashes[rel]
        if digest is None:
            continue
        if digest in first:
            duplicates[rel] = first[digest]
        else:
            first[digest] = rel
    return duplicates


def families(name_rels: dict[str, str], captions: dict[str, str]) -> list[Family]:
    """Group the kept files into families (see the module docstring), sorted by key.

    Args:
        name_rels: ``{rel: path that names the sound}`` (rel without the ``audio/`` of that layout).
        captions: ``{rel: caption}``; takes share a family only if they also share a caption.
    """
    found: dict[str, Family] = {}
    for rel in sorted(name_rels):
        name_rel = name_rels[rel]
        key = f'{family_key(name_rel)}\0{captions[rel].lower()}'
        found.setdefault(key, Family(key, stratum_of(name_rel))).files.append(rel)
    return [found[k] for k in sorted(found)]


def _closer(count: int, size: int, target: float) -> bool:
    """Whether adding ``size`` files to ``count`` brings it strictly closer to ``target``."""
    return abs(count + size - target) < abs(count - target)


def assign_splits(groups: list[Family], valid_fraction: float, previous: dict[str, str]) -> dict[str, str]:
    """Place every family in a split: kept from the last run, else by stratum and overall share.

    Args:
        groups: The families of the kept files (see :func:`families`).
        valid_fraction: Target share of files in the valid split.
        previous: ``{rel: split}`` recorded by the last run.

    Returns:
        ``{rel: "train" | "valid"}`` for every file of ``groups``.
    """
    new = []
    for g in groups:
        old = [previous[r] for r in g.files if previous.get(r) in (TRAIN, VALID)]
        g.split = old[0] if old else None
        if g.split is None:
            new.append(g)
    new.sort(key=lambda g: (g.order, g.key))
    _place_by_stratum(groups, new, valid_fraction)
    _place_overall(groups, new, valid_fraction)
    _make_both_non_empty(groups, new)
    return {rel: g.split or TRAIN for g in groups for rel in g.files}


def _tally(groups: list[Family]) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """Per stratum: files, files in valid, families, families in train or not yet placed."""
    files: dict[str, int] = {}
    valid: dict[str, int] = {}
    count: dict[str, int] = {}
    not_valid: dict[str, int] = {}
    for g in groups:
        files[g.stratum] = files.get(g.stratum, 0) + len(g.files)
        count[g.stratum] = count.get(g.stratum, 0) + 1
        valid.setdefault(g.stratum, 0)
        not_valid.setdefault(g.stratum, 0)
        if g.split == VALID:
            valid[g.stratum] += len(g.files)
        else:
            not_valid[g.stratum] += 1
    return files, valid, count, not_valid


def _place_by_stratum(groups: list[Family], new: list[Family], fraction: float) -> None:
    """Put new families into valid while their stratum stays within its share and keeps a family in train."""
    files, valid, _, not_valid = _tally(groups)
    for g in new:
        s = g.stratum
        if not_valid[s] >= 2 and valid[s] + len(g.files) <= fraction * files[s]:
            g.split = VALID
            valid[s] += len(g.files)
            not_valid[s] -= 1


def _place_overall(groups: list[Family], new: list[Family], fraction: float) -> None:
    """Fill valid from the unplaced new families while that brings the whole split closer to its share.

    Each step takes the next family (in hash order) of the stratum furthest below its own share, preferring
    strata that keep a family in train: the kinds of sound in valid are as many as the share allows.
    """
    files, valid, _, not_valid = _tally(groups)
    total_valid, target = sum(valid.values()), fraction * sum(files.values())
    queues: dict[str, list[Family]] = {}
    for g in reversed(new):  # each queue ends with the stratum's next family in hash order
        if g.split is None:
            queues.setdefault(g.stratum, []).append(g)

    def key(s: str) -> tuple[bool, float, float, str]:
        return (not_valid[s] < 2, valid[s] - fraction * files[s], queues[s][-1].order, s)

    heap = [key(s) for s in queues]  # a heap, not a scan per step: libraries have thousands of folders
    heapq.heapify(heap)
    while heap:
        s = heapq.heappop(heap)[-1]
        g = queues[s][-1]
        if not _closer(total_valid, len(g.files), target):
            break
        queues[s].pop()
        g.split = VALID
        total_valid += len(g.files)
        valid[s] += len(g.files)
        not_valid[s] -= 1
        if queues[s]:
            heapq.heappush(heap, key(s))  # only this stratum's key changed
    for g in new:
        if g.split is None:
            g.split = TRAIN


def _make_both_non_empty(groups: list[Family], new: list[Family]) -> None:
    """With two families or more, move a new family so that neither split is empty (old ones never move)."""
    if len(groups) < 2 or not new:
        return
    if not any(g.split == VALID for g in groups):
        new[0].split = VALID
    elif not any(g.split == TRAIN for g in groups):
        new[-1].split = TRAIN
