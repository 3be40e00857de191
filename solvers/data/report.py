"""The report: issue rows and the fix for each code, report.json/report.txt, and the summary with the Next lines."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from solvers import atomic
from solvers.data.captions import format_source_counts, source_counts
from solvers.data.config import AUDIO_EXTS, UNSUPPORTED_EXTS, PrepareConfig

REJECTED = 'rejected'
FLAGGED = 'flagged'
INFO = 'info'
CAPTIONS_CSV = 'captions.csv'
_STATUS_ORDER = {REJECTED: 0, FLAGGED: 1, INFO: 2}  # rejected rows first in the report, then flagged, then info

FIXES: dict[str, str] = {
    'escapes_root': 'Copy the file into the dataset folder instead of linking to (or naming) a path outside it.',
    'broken_symlink': 'Fix the link target or delete the link.',
    'unsupported_format': 'Convert it to WAV or FLAC, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`.',
    'missing_caption': 'Add a caption: a description or title tag in the file, metadata/<same path>.json (audio/ + '
    "metadata/ layout), <file>.json beside the audio, or a row in a captions CSV/JSONL, with a 'description', 'text' "
    "or 'caption' key; or let more sources caption it (--captions-from metadata,tags,ucs,names).",
    'wordless_name': 'Add a description or title tag to the file, a caption file (<file>.json beside it with '
    '{"description": "..."}, or a row in a captions CSV), or rename it with words (Dog_Bark_Small_01.wav).',
    'duplicate': 'Nothing to do: the same audio is used once. Delete the copy if it was not meant to be there.',
    'empty_caption': 'Write a short description of the sound in the caption field.',
    'bad_caption': 'Make the caption a string (or a list of strings).',
    'malformed_json': 'Fix the JSON syntax at the line/column given (`python -m json.tool FILE` shows it).',
    'not_utf8': 'Re-save the metadata file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`).',
    'bad_json_root': 'The file must hold one JSON object, e.g. {"description": "a dog barking"}.',
    'unreadable_metadata': 'Check that the metadata file exists and is readable.',
    'unreadable_file': 'Check that the file is readable (permissions, network mount).',
    'empty_file': 'The file is zero bytes: copy or export it again.',
    'unreadable': 'The file is corrupt or not audio: export it again as WAV or FLAC.',
    'empty_audio': 'The file holds no samples: export it again.',
    'non_finite': 'The float samples contain NaN/Inf: render or export the source audio again.',
    'silent': 'Delete the file or replace it with the intended recording.',
    'cancels_on_downmix': 'The channels cancel out when mixed to mono (opposite polarity): invert one channel or '
    'keep a single channel.',
    'clipped': 'Export or record it again at a lower gain; heavily clipped audio teaches the model distortion.',
    'too_short': 'Lower --min-seconds to keep it (the default keeps anything from 0.04 s), or merge it with '
    'related clips.',
    'truncated': 'The file is shorter than its header says (interrupted copy?): copy it again if the tail matters.',
    'some_clipping': 'Kept; use a cleaner take if you have one.',
    'over_full_scale': 'Kept after scaling it down to -0.1 dBFS; nothing to do.',
    'upsampled': 'Kept, but it has no content above its Nyquist frequency; prefer sources recorded at >= 16 kHz.',
    'duration_mismatch': "The audio was used as is; correct or delete 'duration' in the metadata file.",
    'sample_rate_mismatch': "The audio was used as is; correct or delete 'sample_rate' in the metadata file.",
    'bad_metadata_value': 'Make the field a number, or delete it.',
    'long_caption': "Kept; AudioGen's text encoder works best with a sentence or two, so consider shortening it.",
    'remainder_dropped': 'Raise --max-seconds, lower --min-seconds, or trim the file.',
    'silent_chunk': 'Trim the silent part of the file.',
    'orphan_metadata': 'Add the matching audio file, or delete the metadata file.',
    'caption_for_missing_audio': 'Fix the path in the captions file, or add the audio file.',
    'ambiguous_caption_path': 'Give the path relative to the dataset folder so it names exactly one file.',
    'bad_captions_row': 'Fix the row in the captions file.',
    'bad_captions_file': 'Fix the captions file (UTF-8, a header with a path column and a caption column).',
    'unreadable_dir': 'Check the folder permissions.',
    'split': "Nothing to do; each chunk keeps the file's caption and goes to the file's split.",
}


@dataclass
class Issue:
    """One row of the report: a rejected or flagged file, why, and what to do about it."""

    path: str
    status: str
    code: str
    reason: str
    fix: str = ''
    metadata_path: str | None = None

    def __post_init__(self) -> None:
        if not self.fix:
            self.fix = FIXES.get(self.code, '')


def sort_issues(issues: list[Issue]) -> None:
    """Sort ``issues`` in place for the report: by status (rejected first), then path, then code."""
    issues.sort(key=lambda i: (_STATUS_ORDER.get(i.status, 3), i.path, i.code))


def report_totals(
    issues: list[Issue],
    kept: dict[str, dict[str, Any]],
    readable: int,
    converted: int,
    stale_removed: int,
    durations: list[float],
    entries: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The ``totals`` of the report: files kept, rejected and flagged, work done, clips and hours per split.

    Args:
        issues: Every issue of the run.
        kept: State records of the files in the manifests, by relative path.
        readable: How many sources could be read.
        converted: How many of them were decoded this run.
        stale_removed: Output files removed because no source produces them any more.
        durations: Seconds of every prepared clip.
        entries: Manifest entries per split.
    """
    rejected_all = {i.path for i in issues if i.status == REJECTED}
    # Audio files only, so that kept + rejected + duplicates == found; captions rows and folders are counted apart.
    rejected = {p for p in rejected_all if Path(p).suffix.lower() in AUDIO_EXTS | UNSUPPORTED_EXTS}
    flagged = {i.path for i in issues if i.status == FLAGGED} & set(kept)
    duplicates = {i.path for i in issues if i.code == 'duplicate'}
    split_hours = {s: sum(e['duration'] for e in rows) / 3600 for s, rows in entries.items()}
    return {
        'audio_files': len(kept) + len(rejected) + len(duplicates),
        'kept_files': len(kept),
        'rejected_files': len(rejected),
        'duplicate_files': len(duplicates),
        'other_rejections': len(rejected_all - rejected),
        'flagged_files': len(flagged),
        'converted': converted,
        'unchanged': readable - converted,
        'stale_removed': stale_removed,
        'clips': len(durations),
        'hours': sum(durations) / 3600,
        'train_clips': len(entries['train']),
        'valid_clips': len(entries['valid']),
        'train_hours': split_hours['train'],
        'valid_hours': split_hours['valid'],
    }


def build_report(
    cfg: PrepareConfig,
    *,
    facts: dict[str, Any],
    params: dict[str, Any],
    totals: dict[str, Any],
    durations: list[float],
    splits: dict[str, str],
    manifests: dict[str, str],
    preset: dict[str, Any],
    notes: list[str],
    issues: list[Issue],
    captions: dict[str, tuple[str | list[str], str]],
    duplicates: dict[str, str],
) -> dict[str, Any]:
    """The report of a run, as written to ``report.json``.

    Args:
        cfg: The resolved config of the run.
        facts: What discovery found out: layout, captions files, hidden entries skipped.
        params: The conversion parameters (their fingerprint is left out).
        totals: See :func:`report_totals`.
        durations: Seconds of every prepared clip.
        splits: ``{source: "train" | "valid"}``.
        manifests: ``{split: manifest path}``.
        preset: The preset's path, what was done to it and its settings.
        notes: Notes for the user.
        issues: Every issue, sorted with :func:`sort_issues`.
        captions: ``{rel: (caption, source)}`` of the kept files.
        duplicates: ``{duplicate: the file kept instead}``.
    """
    return {
        'name': cfg.name,
        'dataset_dir': str(cfg.dataset_dir),
        'out_dir': str(cfg.out_dir),
        **facts,
        'params': {k: v for k, v in params.items() if k != 'fingerprint'},
        'totals': totals,
        'histogram': _histogram(durations),
        'caption_sources': source_counts([source for _, source in captions.values()]),
        'captions': {rel: {'caption': c, 'source': source} for rel, (c, source) in captions.items()},
        'duplicates': duplicates,
        'splits': {rel: splits[rel] for rel in sorted(splits)},
        'manifests': manifests,
        'preset': preset,
        'notes': notes,
        'issues': [asdict(i) for i in issues],
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json``, ``report.txt`` and ``captions.csv`` into ``out_dir`` atomically, then sync the folder."""
    with atomic.open_atomic(out_dir / 'report.json', 'w', encoding='utf-8') as f:  # streamed: big for a library
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write('\n')
    atomic.write_bytes(out_dir / 'report.txt', format_report_text(report).encode('utf-8'))
    atomic.write_bytes(out_dir / CAPTIONS_CSV, captions_csv(report['captions']).encode('utf-8'))
    atomic.fsync_dir(out_dir)


def captions_csv(captions: dict[str, dict[str, Any]]) -> str:
    """Every kept file's caption and its source, one row per caption: a captions file ``--captions`` reads back.

    Paths are relative to the dataset folder, so the edited file works as ``--captions data/NAME/captions.csv``.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['path', 'caption', 'source'])
    for rel, entry in captions.items():
        texts = entry['caption'] if isinstance(entry['caption'], list) else [entry['caption']]
        writer.writerows([rel, text, entry['source']] for text in texts)
    return buf.getvalue()


def _histogram(durations: list[float]) -> list[dict[str, Any]]:
    edges = [0, 1, 2, 5, 10, 20, 30, 60]
    rows = []
    for lo, hi in zip(edges, edges[1:] + [math.inf]):
        n = sum(1 for d in durations if lo <= d < hi)
        rows.append({'from_s': lo, 'to_s': None if hi == math.inf else hi, 'count': n})
    return rows


def _issue_groups(issues: list[dict[str, Any]]) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Issues grouped by (status, code): rejected first, the biggest groups first; each with its one fix."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for issue in issues:
        groups.setdefault((issue['status'], issue['code']), []).append(issue)
    keys = sorted(groups, key=lambda k: (_STATUS_ORDER.get(k[0], 3), -len(groups[k]), k[1]))
    return [(status, code, groups[(status, code)][0]['fix'], groups[(status, code)]) for status, code in keys]


def format_report_text(report: dict[str, Any]) -> str:
    """Human-readable version of ``report.json``: totals, durations, then problems grouped by reason."""
    t = report['totals']
    lines = [
        f'Dataset preparation report: {report["name"]}',
        f'Source: {report["dataset_dir"]} (layout: {report["layout"]})',
        f'Output: {report["out_dir"]}',
        '',
        f'Audio files found:  {t["audio_files"]}',
        f'Kept:               {t["kept_files"]} ({t["flagged_files"]} of them flagged)',
        f'Rejected:           {t["rejected_files"]} (+ {t["other_rejections"]} captions rows / folders)',
        f'Duplicates:         {t["duplicate_files"]} (the same audio as a kept file: kept once)',
        f'Captions:           {format_source_counts(report["caption_sources"])}',
        f'Decoded this run: {t["converted"]}   unchanged since last run: {t["unchanged"]}   '
        f'stale outputs removed: {t["stale_removed"]}',
        f'Prepared clips:     {t["clips"]} = {t["hours"]:.3f} h '
        f'(train {t["train_clips"]} clips / {t["train_hours"]:.3f} h, '
        f'valid {t["valid_clips"]} clips / {t["valid_hours"]:.3f} h)',
        '',
        'Clip durations:',
    ]
    peak = max([r['count'] for r in report['histogram']] + [1])
    for r in report['histogram']:
        label = f'{r["from_s"]:>3}-{r["to_s"]:<3} s' if r['to_s'] is not None else f'{r["from_s"]:>3}+    s'
        lines.append(f'  {label} {r["count"]:6d} {"#" * round(40 * r["count"] / peak)}')
    for note in report['notes']:
        lines.append(f'Note: {note}')
    lines.append('')
    if not report['issues']:
        lines.append('No problems found.')
    for status, code, fix, rows in _issue_groups(report['issues']):
        lines.append(f'[{status.upper()}] {code}: {len(rows)} file(s)')
        if fix:
            lines.append(f'  fix: {fix}')
        lines += [f'  - {i["path"]}: {i["reason"]}' for i in rows]
        lines.append('')
    lines += _caption_lines(report)
    return '\n'.join(lines).rstrip('\n') + '\n'


def _caption_lines(report: dict[str, Any]) -> list[str]:
    """The captions of the kept files by source, for a review before training, and how to fix one."""
    if not report['captions']:
        return []
    csv_path = Path(report['out_dir']) / CAPTIONS_CSV
    lines = [
        'Captions by source (review them before training; to fix one, edit '
        f'{csv_path} and re-run with --captions {csv_path}, or fix the tag or caption file):'
    ]
    for source in report['caption_sources']:
        lines.append(f'  {source}:')
        lines += [f'    {rel}: {e["caption"]}' for rel, e in report['captions'].items() if e['source'] == source]
    return lines


def next_commands(name: str) -> list[str]:
    """What to run after preparing ``name``: the tiny stand-in on a CPU, or medium on a GPU."""
    from solvers.project import outputs_dir

    lines = ['Next, on this CPU with the tiny stand-in model (a few minutes):']
    if not (outputs_dir() / 'pretrained' / 'tiny').is_dir():
        lines.append('  python -m scripts.make_tiny_package')
    lines += [
        f'  dora run solver=audiogen/tiny dataset={name}',
        'On a GPU, fine-tune facebook/audiogen-medium (README: which preset for which GPU):',
        f'  dora run solver=audiogen/train dataset={name}',
    ]
    return lines


def format_summary(report: dict[str, Any]) -> str:
    """The few lines printed on stdout after a run: totals, where things are, rejections by reason, next steps."""
    t = report['totals']
    preset = report['preset']
    out = Path(report['out_dir'])
    dups = f', {t["duplicate_files"]} duplicates of a kept file' if t['duplicate_files'] else ''
    lines = [
        f"Prepared '{report['name']}' from {report['dataset_dir']} ({report['layout']}).",
        f'  {t["audio_files"]} audio files: {t["kept_files"]} kept ({t["flagged_files"]} flagged), '
        f'{t["rejected_files"]} rejected{dups}; converted {t["converted"]}, unchanged {t["unchanged"]}.',
        f'  captions: {format_source_counts(report["caption_sources"])} (review: {out / CAPTIONS_CSV})',
        f'  {t["clips"]} clips, {t["hours"]:.3f} h: train {t["train_clips"]}, valid {t["valid_clips"]}.',
    ]
    if report['manifests']:
        lines += [
            f'  manifests: {report["manifests"]["train"]}, {report["manifests"]["valid"]}',
            f'  preset:    {preset["path"]} ({preset["action"]}; {preset["segment_duration"]:g} s segments, '
            f'{preset["num_workers"]} loader workers, samples of {len(preset["prompts"])} of your captions)',
        ]
    lines.append(f'  report:    {out / "report.txt"}')
    for status, code, fix, rows in _issue_groups(report['issues']):
        if status == REJECTED:
            example = rows[0]['path'] + (f' and {len(rows) - 1} more' if len(rows) > 1 else '')
            lines.append(f'  rejected {code} x{len(rows)} ({example}): {fix}')
    if report['duplicates']:
        dup, original = next(iter(report['duplicates'].items()))
        more = f' and {len(report["duplicates"]) - 1} more' if len(report['duplicates']) > 1 else ''
        lines.append(f'  duplicates: {dup} = {original}{more}; each audio is kept once (report.txt lists them)')
    lines += [f'  note: {n}' for n in report['notes']]
    if t['kept_files']:
        lines += next_commands(report['name'])
    return '\n'.join(lines)
