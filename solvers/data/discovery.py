"""Discovery: the audio files of the user's folder and their captions, whatever the layout."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solvers.data.config import AUDIO_EXTS, UNSUPPORTED_EXTS, PrepareConfig, _hash_text, _is_within
from solvers.data.report import FLAGGED, REJECTED, Issue

CAPTION_KEYS = ('description', 'text', 'caption')
PATH_KEYS = ('path', 'file', 'file_name', 'filename', 'audio', 'audio_path', 'wav')
CAPTIONS_FILE_EXTS = ('.csv', '.jsonl')
LONG_CAPTION_CHARS = 1000  # T5 sees ~4 characters per token; beyond ~250 tokens captions are unlike AudioGen's
JSON_TYPES = {bool: 'boolean', int: 'number', float: 'number', dict: 'object', type(None): 'null'}
# Where each audio file may be named in a captions file, by its relative path, stem or file name (see _index_audio).
_AudioIndex = tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]]]


@dataclass
class Source:
    """An audio file of the dataset with its caption (or the reason it has none)."""

    rel: str  # path relative to the dataset folder, POSIX separators
    path: str  # absolute path
    base: str  # output name stem, unique per source
    caption: str | list[str] | None = None  # from a caption file; the final one is chosen by captions.resolve_caption
    metadata_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    name_rel: str = ''  # rel without the audio/ of the audio/ + metadata/ layout: the path whose words name the sound
    caption_problem: tuple[str, str] | None = None  # why no caption file captions it, as (code, reason)


def clean_caption(value: Any) -> str | list[str] | None:
    """Normalise a caption: NFC unicode, no control characters, single spaces; lists keep non-empty items.

    Returns:
        The cleaned caption, ``None`` if it is empty; raises ``TypeError`` if it is neither a string nor a list.
    """
    if isinstance(value, list):
        items = [clean_caption(v) for v in value]
        kept = [v for v in items if isinstance(v, str)]
        return kept[0] if len(kept) == 1 else (kept or None)
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    text = unicodedata.normalize('NFC', value)
    text = ''.join(' ' if unicodedata.category(c)[0] in 'CZ' else c for c in text)
    text = ' '.join(text.split())
    return text or None


def walk_files(root: Path, issues: list[Issue]) -> tuple[list[tuple[str, Path]], int]:
    """List the files under ``root`` without leaving it.

    Symlinks that resolve outside ``root`` (and broken ones) are reported instead of followed; symlinked folders
    inside ``root`` are followed once. Hidden entries (``.name``, e.g. macOS ``._x.wav``) are skipped and counted.

    Returns:
        ``[(relative POSIX path, path), ...]`` sorted by relative path, and the number of hidden entries skipped.
    """
    real_root = os.path.realpath(root)
    visited = {real_root}
    stack = [root]
    found: list[tuple[str, Path]] = []
    hidden = 0
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            issues.append(Issue(folder.relative_to(root).as_posix() or '.', REJECTED, 'unreadable_dir', str(err)))
            continue
        for entry in entries:
            if entry.name.startswith('.'):
                hidden += 1
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_symlink():
                real = os.path.realpath(path)
                if not os.path.exists(real):
                    issues.append(Issue(rel, REJECTED, 'broken_symlink', f'symlink to missing {os.readlink(path)}'))
                    continue
                if not _is_within(real, real_root):
                    issues.append(
                        Issue(rel, REJECTED, 'escapes_root', f'symlink points outside the dataset folder, to {real}')
                    )
                    continue
                if os.path.isdir(real):
                    if real not in visited:
                        visited.add(real)
                        stack.append(path)
                    continue
                found.append((rel, path))
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.realpath(path)
                if real not in visited:
                    visited.add(real)
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.append((rel, path))
    found.sort()
    return found, hidden


def read_json_object(path: Path, rel: str) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """Read a metadata JSON file.

    Returns:
        The object, or ``None`` and ``(code, reason)`` naming what is wrong (encoding, syntax, not an object).
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, ('unreadable_metadata', f'cannot read {rel}: {err.strerror}')
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as err:
        return None, ('not_utf8', f'{rel} is not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start}')
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, ('malformed_json', f'{rel} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})')
    if not isinstance(obj, dict):
        return None, ('bad_json_root', f'{rel} holds a JSON {type(obj).__name__}, not an object')
    return obj, None


def caption_from_object(obj: dict[str, Any], where: str) -> tuple[str | list[str] | None, tuple[str, str] | None]:
    """Pick the caption out of a metadata object (``description``, ``text`` or ``caption``, then ``caption_N``).

    Returns:
        The cleaned caption, or ``None`` and ``(code, reason)``.
    """
    keys = [k for k in CAPTION_KEYS if k in obj] + sorted(k for k in obj if re.fullmatch(r'caption_\d+', str(k)))
    if not keys:
        return None, ('missing_caption', f"{where} has no 'description', 'text' or 'caption' key")
    captions: list[str] = []
    for key in keys:
        try:
            value = clean_caption(obj[key])
        except TypeError:
            kind = JSON_TYPES.get(type(obj[key]), type(obj[key]).__name__)
            return None, ('bad_caption', f"'{key}' in {where} is a JSON {kind} ({str(obj[key])[:40]}), not text")
        if isinstance(value, str):
            captions.append(value)
        elif value:
            captions.extend(value)
    captions = list(dict.fromkeys(captions))
    if not captions:
        return None, ('empty_caption', f'the caption in {where} is empty or whitespace')
    return (captions[0] if len(captions) == 1 else captions), None


def _lower_keys(row: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in row.items() if k is not None}


def read_captions_file(path: Path, rel: str, issues: list[Issue]) -> list[tuple[str, dict[str, Any], str]]:
    """Read a CSV (header row) or JSONL captions file.

    Returns:
        ``[(audio path as written, row, "file:line"), ...]``; problems are appended to ``issues``.
    """
    try:
        text = path.read_bytes().decode('utf-8-sig')
    except UnicodeDecodeError as err:
        issues.append(Issue(rel, REJECTED, 'bad_captions_file', f'{rel} is not UTF-8 (offset {err.start})'))
        return []
    except OSError as err:
        issues.append(Issue(rel, REJECTED, 'bad_captions_file', f'cannot read {rel}: {err.strerror}'))
        return []
    rows = _jsonl_rows(text, rel, issues) if path.suffix.lower() == '.jsonl' else _csv_rows(text, rel, issues)
    out = []
    for lineno, row in rows or []:
        where = f'{rel}:{lineno}'
        key = next((k for k in PATH_KEYS if k in row and str(row[k] or '').strip()), None)
        if key is None:
            issues.append(
                Issue(
                    where,
                    REJECTED,
                    'bad_captions_row',
                    f'no audio path (expected a column named one of {", ".join(PATH_KEYS)})',
                )
            )
            continue
        out.append((str(row[key]).strip(), row, where))
    return out


def _jsonl_rows(text: str, rel: str, issues: list[Issue]) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL captions file with their line numbers; other lines go to ``issues``."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            issues.append(Issue(f'{rel}:{lineno}', REJECTED, 'bad_captions_row', f'invalid JSON: {err.msg}'))
            continue
        if not isinstance(obj, dict):
            issues.append(Issue(f'{rel}:{lineno}', REJECTED, 'bad_captions_row', 'line is not a JSON object'))
            continue
        rows.append((lineno, _lower_keys(obj)))
    return rows


def _csv_rows(text: str, rel: str, issues: list[Issue]) -> list[tuple[int, dict[str, Any]]] | None:
    """The rows of a CSV captions file (delimiter sniffed) with their line numbers; ``None`` if it does not parse."""
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=',;\t')
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    try:
        return [(reader.line_num, _lower_keys(row)) for row in reader]
    except csv.Error as err:
        issues.append(Issue(rel, REJECTED, 'bad_captions_file', f'{rel}: {err}'))
        return None


def _flat_name(rel: str) -> str:
    stem = rel.rsplit('.', 1)[0] if '.' in rel.rsplit('/', 1)[-1] else rel
    flat = re.sub(r'[^A-Za-z0-9_.-]+', '_', stem.replace('/', '__')).strip('._') or 'audio'
    return flat[:100]


def _match_caption_path(
    written: str,
    root: Path,
    cdir: str,
    by_rel: dict[str, str],
    by_stem: dict[str, list[str]],
    by_name: dict[str, list[str]],
) -> tuple[list[str], bool]:
    """Audio files a captions-file path names: relative to the dataset, then to the captions file, then by name.

    Returns:
        The matching relative paths, and whether the path pointed outside the dataset folder.
    """
    norm = written.replace('\\', '/')
    escaped = False
    for base in dict.fromkeys(['.', cdir]):
        joined = os.path.normpath(os.path.join(root, base, norm))
        if not _is_within(joined, str(root)):
            escaped = True
            continue
        key = Path(os.path.relpath(joined, root)).as_posix()
        candidates = [key] if key in by_rel else by_stem.get(key, [])
        if candidates:
            return candidates, escaped
    if escaped:
        return [], True
    return by_name.get(norm.rsplit('/', 1)[-1], []), False


def discover(cfg: PrepareConfig) -> tuple[list[Source], list[Issue], dict[str, Any]]:
    """Find the audio files of the dataset and their captions from caption files, whatever the layout.

    A file's caption-file caption comes from the first of: a captions CSV/JSONL row,
    ``metadata/<path under audio/>.json`` (``audio/`` + ``metadata/`` layout), ``<file>.json`` beside it. Files
    without one are still returned (with ``caption_problem`` set): tags and names may caption them
    (:func:`solvers.data.captions.resolve_caption`, in the conversion workers).

    Args:
        cfg: A resolved config.

    Returns:
        Every audio file as a source (sorted), issues (unsafe or unreadable files, orphan metadata...), and facts
        for the report.
    """
    root = Path(cfg.dataset_dir)  # type: ignore[arg-type]
    issues: list[Issue] = []
    files, hidden = walk_files(root, issues)
    split_layout = (root / 'audio').is_dir() and (root / 'metadata').is_dir()
    audio, jsons = _sort_files(files, issues)
    use_metadata = 'metadata' in cfg.captions_from
    caption_files = _caption_files(cfg, root, files) if use_metadata else []
    row_captions = _row_captions(root, caption_files, _index_audio(audio), issues)
    sources: list[Source] = []
    used_json: set[str] = set()
    bases: set[str] = set()
    for rel, path in audio:
        name_rel = rel[len('audio/') :] if split_layout and rel.startswith('audio/') else rel
        src = Source(rel=rel, path=str(path), base=_unique_base(name_rel, rel, bases), name_rel=name_rel)
        if not use_metadata:
            src.caption_problem = ('missing_caption', 'caption files not read (--captions-from)')
        elif rel in row_captions:
            src.caption_problem = _caption_from_rows(src, row_captions[rel])
        else:
            src.caption_problem = _caption_from_json(src, split_layout, jsons, bool(caption_files), used_json)
        sources.append(src)

    for rel in sorted(set(jsons) - used_json) if use_metadata else []:
        if '/' in rel:  # top-level JSON files are often dataset cards, not per-file metadata
            issues.append(Issue(rel, FLAGGED, 'orphan_metadata', 'no audio file uses this metadata file'))
    layout = 'captions file' if caption_files else 'audio/ + metadata/' if split_layout else 'sidecar JSON'
    facts = {
        'layout': layout if caption_files or used_json else 'no caption files',
        'captions_files': [c for c, _ in caption_files],
        'hidden_skipped': hidden,
    }
    return sources, issues, facts


def _sort_files(files: list[tuple[str, Path]], issues: list[Issue]) -> tuple[list[tuple[str, Path]], dict[str, Path]]:
    """Split the dataset's files into audio and JSON metadata; formats libsndfile cannot read go to ``issues``."""
    audio: list[tuple[str, Path]] = []
    jsons: dict[str, Path] = {}
    for rel, path in files:
        ext = path.suffix.lower()
        if ext in AUDIO_EXTS:
            audio.append((rel, path))
        elif ext in UNSUPPORTED_EXTS:
            issues.append(Issue(rel, REJECTED, 'unsupported_format', f"'{ext}' files cannot be decoded without ffmpeg"))
        elif ext == '.json':
            jsons[rel] = path
    return audio, jsons


def _caption_files(cfg: PrepareConfig, root: Path, files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The captions files to read: ``--captions``, or else the top-level CSV/JSONL files of the dataset."""
    if cfg.captions is not None:
        return [(os.path.relpath(cfg.captions, root), Path(cfg.captions))]
    return [(rel, p) for rel, p in files if '/' not in rel and p.suffix.lower() in CAPTIONS_FILE_EXTS]


def _index_audio(audio: list[tuple[str, Path]]) -> _AudioIndex:
    """The audio files by relative path, by path without extension, and by file name with and without extension."""
    by_rel = {rel: rel for rel, _ in audio}
    by_stem: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for rel, _ in audio:
        by_stem.setdefault(rel.rsplit('.', 1)[0], []).append(rel)
        by_name.setdefault(rel.rsplit('/', 1)[-1], []).append(rel)
        by_name.setdefault(rel.rsplit('/', 1)[-1].rsplit('.', 1)[0], []).append(rel)
    return by_rel, by_stem, by_name


def _row_captions(
    root: Path, caption_files: list[tuple[str, Path]], index: _AudioIndex, issues: list[Issue]
) -> dict[str, list[tuple[dict[str, Any], str]]]:
    """The captions-file rows of each audio file, ``{rel: [(row, "file:line"), ...]}``; unmatched rows are issues."""
    row_captions: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for crel, cpath in caption_files:
        cdir = os.path.relpath(cpath.parent, root)
        for written, row, where in read_captions_file(cpath, crel, issues):
            candidates, escaped = _match_caption_path(written, root, cdir, *index)
            if escaped and not candidates:
                issues.append(Issue(where, REJECTED, 'escapes_root', f"'{written}' points outside the dataset folder"))
            elif len(candidates) != 1:
                code = 'ambiguous_caption_path' if candidates else 'caption_for_missing_audio'
                detail = f'matches {len(candidates)} files' if candidates else 'matches no audio file'
                issues.append(Issue(where, FLAGGED, code, f"'{written}' {detail}"))
            else:
                row_captions.setdefault(candidates[0], []).append((row, where))
    return row_captions


def _unique_base(name_rel: str, rel: str, bases: set[str]) -> str:
    """The output name stem of a source: its flattened path and a short hash, never one already in ``bases``."""
    base = f'{_flat_name(name_rel)}-{_hash_text(rel, 4)}'
    if base in bases:  # same flattened name and same 32-bit hash: astronomically unlikely, but never overwrite
        base = f'{base}-{_hash_text(rel, 8)}'
    bases.add(base)
    return base


def _caption_from_rows(src: Source, entries: list[tuple[dict[str, Any], str]]) -> tuple[str, str] | None:
    """Set ``src``'s caption and metadata from its captions-file rows; returns ``(code, reason)`` if none is usable."""
    problem: tuple[str, str] | None = None
    captions: list[str] = []
    for row, where in entries:
        cap, problem = caption_from_object(row, where)
        if isinstance(cap, str):
            captions.append(cap)
        elif cap:
            captions.extend(cap)
    captions = list(dict.fromkeys(captions))
    src.metadata_path = entries[0][1]
    src.metadata = entries[0][0]
    if captions:
        src.caption, problem = (captions[0] if len(captions) == 1 else captions), None
    return problem


def _caption_from_json(
    src: Source, split_layout: bool, jsons: dict[str, Path], has_caption_files: bool, used_json: set[str]
) -> tuple[str, str] | None:
    """Set ``src``'s caption and metadata from its metadata JSON (mirrored under metadata/, else beside the file).

    Returns:
        ``(code, reason)`` if there is no such file or it holds no usable caption; the file used joins ``used_json``.
    """
    rel = src.rel
    meta_rel = None
    stem = rel.rsplit('.', 1)[0]
    if split_layout and rel.startswith('audio/'):
        mirrored = 'metadata/' + stem[len('audio/') :] + '.json'
        meta_rel = mirrored if mirrored in jsons else None
    if meta_rel is None and stem + '.json' in jsons:
        meta_rel = stem + '.json'
    if meta_rel is None:
        looked = ['a captions file row'] if has_caption_files else []
        if split_layout and rel.startswith('audio/'):
            looked.append(f'metadata/{stem[len("audio/") :]}.json')
        looked.append(f'{stem}.json')
        return 'missing_caption', f'no caption found (looked for {", ".join(looked)})'
    used_json.add(meta_rel)
    src.metadata_path = meta_rel
    obj, problem = read_json_object(jsons[meta_rel], meta_rel)
    if obj is not None:
        src.metadata = obj
        src.caption, problem = caption_from_object(obj, meta_rel)
    return problem
