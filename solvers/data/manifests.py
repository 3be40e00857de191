"""Manifests: audiocraft's data.jsonl.gz files of each split, and reading them back (read_manifest)."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from solvers import atomic
from solvers.data.config import SAMPLE_RATE, DatasetError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def sample_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of an XP's samples: `generate.prompts`, or when null the first `generate.prompts_from_dataset`
    distinct captions of its valid split, then of its train split."""
    if cfg.generate.prompts is not None:
        return [str(p) for p in cfg.generate.prompts]
    wanted = int(cfg.generate.get('prompts_from_dataset') or 0)
    found: list[str] = []
    for split in ('valid', 'train'):
        path = cfg.datasource.get(split)
        if isinstance(path, str) and len(found) < wanted:
            found += [c for c in manifest_captions(path, wanted) if c not in found]
    return found[:wanted]


def clip_durations(kept: dict[str, dict[str, Any]]) -> list[float]:
    """Seconds of every prepared clip of the kept sources' state records, in record order."""
    return [o['duration'] for r in kept.values() for o in r['outputs']]


def manifest_entries(
    kept: dict[str, dict[str, Any]], splits: dict[str, str], wav_dir: Path
) -> dict[str, list[dict[str, Any]]]:
    """audiocraft ``AudioMeta`` entries of every prepared clip, per split; each chunk goes to its source's split."""
    entries: dict[str, list[dict[str, Any]]] = {'train': [], 'valid': []}
    real_wav_dir = wav_dir.resolve()
    for rel, rec in kept.items():
        for o in rec['outputs']:
            entries[splits[rel]].append(
                {
                    'path': str(real_wav_dir / o['name']),
                    'duration': o['duration'],
                    'sample_rate': SAMPLE_RATE,
                    'amplitude': None,
                    'weight': None,
                    'info_path': None,
                }
            )
    return entries


def manifest_bytes(entries: list[dict[str, Any]]) -> bytes:
    """Gzipped audiocraft ``AudioMeta`` JSON lines, byte-identical for identical entries (gzip mtime 0)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode='wb', mtime=0) as gz:
        for e in sorted(entries, key=lambda e: e['path']):
            gz.write((json.dumps(e) + '\n').encode('utf-8'))
    return buf.getvalue()


def write_manifests(egs_dir: Path, entries: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Write ``<egs_dir>/<split>/data.jsonl.gz`` for each split atomically; returns ``{split: path}``."""
    manifests = {}
    for split, rows in entries.items():
        (egs_dir / split).mkdir(parents=True, exist_ok=True)
        target = egs_dir / split / 'data.jsonl.gz'
        atomic.write_bytes(target, manifest_bytes(rows))
        manifests[split] = str(target)
    return manifests


def read_manifest(split_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a split's manifest (``<split_dir>/data.jsonl.gz`` or ``data.jsonl``, or that file itself).

    Raises:
        DatasetError: the manifest is missing or unreadable, naming the path and how to make it.
    """
    path = Path(split_dir)
    if path.is_dir():
        path = next((path / n for n in ('data.jsonl.gz', 'data.jsonl') if (path / n).is_file()), path / 'data.jsonl.gz')
    try:
        opener = gzip.open if path.suffix == '.gz' else open
        with opener(path, 'rt', encoding='utf-8') as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as err:
        raise DatasetError(
            f'Cannot read the manifest {path} ({err}). Prepare the dataset with '
            '`python -m scripts.prepare_dataset DIR --name NAME`, then pass dataset=NAME.'
        ) from err


def manifest_captions(split_dir: str | os.PathLike, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions of a split, in manifest order, from the JSON beside each clip."""
    captions: list[str] = []
    for entry in read_manifest(split_dir):
        if len(captions) >= limit:
            break
        try:
            info = json.loads(Path(entry['path']).with_suffix('.json').read_text(encoding='utf-8'))
        except (OSError, ValueError):
            continue
        text = info.get('description')
        text = text[0] if isinstance(text, list) and text else text
        if isinstance(text, str) and text.strip() and text not in captions:
            captions.append(text)
    return captions
