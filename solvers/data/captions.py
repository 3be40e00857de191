"""Where a file's caption comes from: caption files, embedded tags, UCS names, folder and file names, in order.

The order is ``PrepareConfig.captions_from`` (``--captions-from``); the first source that gives a caption wins,
and the caption records which source it came from (the summary counts them, ``captions.csv`` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from solvers.data.config import CAPTION_SOURCES
from solvers.data.names import names_caption, ucs_caption, words
from solvers.data.tags import TAG_FIELDS

if TYPE_CHECKING:
    from solvers.data.discovery import Source

SOURCE_LABELS = {'metadata': 'from metadata', 'tags': 'from tags', 'ucs': 'UCS', 'names': 'from names'}


@dataclass
class Caption:
    """The caption a file gets and its source, or the ``(code, reason)`` it is rejected for."""

    text: str | list[str] | None
    source: str | None
    problem: tuple[str, str] | None = None


def tags_caption(tags: dict[str, str]) -> str | None:
    """The first tag of description, title, comment, subject, keywords that holds words (not "Take 3", "0001")."""
    for field in TAG_FIELDS:
        text = tags.get(field)
        if text and words(text):
            return text
    return None


def _from(source: str, src: Source, tags: dict[str, str]) -> str | list[str] | None:
    """The caption one source gives ``src``, or ``None``."""
    if source == 'metadata':
        return src.caption
    if source == 'tags':
        return tags_caption(tags)
    if source == 'ucs':
        return ucs_caption(src.name_rel)
    return names_caption(src.name_rel)


def _missing(src: Source, order: tuple[str, ...]) -> tuple[str, str]:
    """Why no source captions a file: ``wordless_name`` when its name was tried, else what was looked at."""
    looked = []
    if 'metadata' in order and src.caption_problem is not None:
        looked.append(src.caption_problem[1].replace('no caption found (', 'no caption file ('))
    if 'tags' in order:
        looked.append('no description, title or comment tag')
    if 'ucs' in order and 'names' not in order:
        looked.append('not a UCS name (CatID_FXName_CreatorID_SourceID)')
    stem = src.name_rel.rsplit('/', 1)[-1]
    if 'names' in order:
        return 'wordless_name', f"'{stem}' has no words to caption it; {', '.join(looked) or 'no other source'}"
    return 'missing_caption', f'no caption: {", ".join(looked) or "no caption source"}'


def resolve_caption(src: Source, tags: dict[str, str], order: tuple[str, ...]) -> Caption:
    """The caption of ``src`` from the first source of ``order`` that gives one.

    A caption file that exists but is broken (bad JSON, an empty or non-text caption) rejects the file when its
    turn comes, rather than falling through to a guess: the user meant to caption it.

    Args:
        src: The source, with its caption-file caption (or the problem found) from discovery.
        tags: The file's tags (see :func:`solvers.data.tags.read_tags`).
        order: Sources to try, a subset of :data:`CAPTION_SOURCES`.
    """
    for source in order:
        if source == 'metadata' and src.caption is None and src.caption_problem is not None:
            if src.caption_problem[0] != 'missing_caption':
                return Caption(None, None, src.caption_problem)
            continue
        text = _from(source, src, tags)
        if text:
            return Caption(text, source)
    return Caption(None, None, _missing(src, order))


def source_counts(sources: list[str]) -> dict[str, int]:
    """How many captions came from each source, in :data:`CAPTION_SOURCES` order (sources with none left out)."""
    return {s: sources.count(s) for s in CAPTION_SOURCES if s in sources}


def format_source_counts(counts: dict[str, int]) -> str:
    """``"12 from metadata, 30 from tags, 8 UCS, 40 from names"``."""
    return ', '.join(f'{n} {SOURCE_LABELS[s]}' for s, n in counts.items()) or 'none'
