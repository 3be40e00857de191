"""Turn a user's sound folder or library into 16 kHz mono WAVs, audiocraft manifests, a dataset preset and a report.

:func:`prepare` runs the steps; each role lives in a module of this package and its names are re-exported here:

- :mod:`.config`: :class:`PrepareConfig`, :class:`DatasetError` and the constants every step shares;
- :mod:`.discovery`: the audio files of the user's folder and their caption files, whatever the layout;
- :mod:`.tags`, :mod:`.names`, :mod:`.captions`: captions from embedded tags, UCS and folder/file names, and the
  order of the caption sources;
- :mod:`.conversion`: decode, check, downmix, resample, cut and encode one file, then caption it (the worker
  function);
- :mod:`.splits`: duplicates kept once, families of takes, the leak-free stratified split;
- :mod:`.state`: the output folder's lock, the state journal that makes re-runs incremental, clean-up;
- :mod:`.manifests`: the split, the manifests, and :func:`read_manifest` / :func:`manifest_captions` for later stages;
- :mod:`.preset`: the dataset preset YAML;
- :mod:`.report`: issues, ``report.json`` / ``report.txt`` and the summary printed with the next commands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Worker processes import this package: keep it free of torch/audiocraft imports (they cost seconds).
from solvers.data.captions import Caption, format_source_counts, resolve_caption, source_counts, tags_caption
from solvers.data.config import (
    AUDIO_EXTS,
    CAPTION_SOURCES,
    MIN_SECONDS,
    NAME_RE,
    SAMPLE_RATE,
    UNSUPPORTED_EXTS,
    DatasetError,
    PrepareConfig,
)
from solvers.data.conversion import (
    CLIP_FLAG_FRACTION,
    CLIP_LEVEL,
    CLIP_REJECT_FRACTION,
    METADATA_DURATION_TOLERANCE,
    SILENCE_PEAK,
    ConvertResult,
    ConvertTask,
    conversion_params,
    convert_one,
    encode_wav_pcm16,
    iter_results,
    make_tasks,
    plan_chunks,
)
from solvers.data.discovery import (
    CAPTION_KEYS,
    CAPTIONS_FILE_EXTS,
    JSON_TYPES,
    LONG_CAPTION_CHARS,
    PATH_KEYS,
    Source,
    caption_from_object,
    clean_caption,
    discover,
    read_captions_file,
    read_json_object,
    walk_files,
)
from solvers.data.manifests import (
    clip_durations,
    manifest_bytes,
    manifest_captions,
    manifest_entries,
    read_manifest,
    sample_prompts,
    write_manifests,
)
from solvers.data.preset import (
    PACKAGE_LINE,
    PRESET_MARK,
    PresetSettings,
    manifest_ref,
    preset_settings,
    preset_text,
    write_preset,
)
from solvers.data.report import (
    FIXES,
    FLAGGED,
    INFO,
    REJECTED,
    Issue,
    build_report,
    format_report_text,
    format_summary,
    next_commands,
    report_totals,
    sort_issues,
    write_report,
)
from solvers.data.splits import Family, assign_splits, families, find_duplicates
from solvers.data.state import (
    LOCK_FILE,
    STATE_FILE,
    STATE_VERSION,
    WAV_SUBDIR,
    append_record,
    load_state,
    output_lock,
    remove_stale_outputs,
    remove_temp_files,
    write_state,
)
from solvers.data.tags import read_tags

__all__ = [
    'SAMPLE_RATE',
    'AUDIO_EXTS',
    'UNSUPPORTED_EXTS',
    'CAPTION_KEYS',
    'PATH_KEYS',
    'CAPTIONS_FILE_EXTS',
    'SILENCE_PEAK',
    'CLIP_LEVEL',
    'CLIP_REJECT_FRACTION',
    'CLIP_FLAG_FRACTION',
    'LONG_CAPTION_CHARS',
    'METADATA_DURATION_TOLERANCE',
    'STATE_FILE',
    'LOCK_FILE',
    'WAV_SUBDIR',
    'STATE_VERSION',
    'NAME_RE',
    'MIN_SECONDS',
    'PRESET_MARK',
    'JSON_TYPES',
    'REJECTED',
    'FLAGGED',
    'INFO',
    'FIXES',
    'DatasetError',
    'PrepareConfig',
    'Issue',
    'Source',
    'ConvertTask',
    'ConvertResult',
    'encode_wav_pcm16',
    'clean_caption',
    'plan_chunks',
    'convert_one',
    'walk_files',
    'read_json_object',
    'caption_from_object',
    'read_captions_file',
    'discover',
    'CAPTION_SOURCES',
    'Caption',
    'resolve_caption',
    'tags_caption',
    'source_counts',
    'format_source_counts',
    'read_tags',
    'Family',
    'families',
    'find_duplicates',
    'assign_splits',
    'manifest_bytes',
    'read_manifest',
    'sample_prompts',
    'manifest_captions',
    'PresetSettings',
    'preset_settings',
    'preset_text',
    'PACKAGE_LINE',
    'write_preset',
    'format_report_text',
    'next_commands',
    'format_summary',
    'load_state',
    'PrepareResult',
    'prepare',
]


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare`: the report (also written to disk) and the exit status for the CLI."""

    report: dict[str, Any]
    exit_code: int


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Prepare a dataset: discover, convert in parallel, split, write manifests, preset, report and state.

    Safe to interrupt and re-run: outputs are written atomically, the state journal records each finished file
    (with its tags, audio hash and split), a re-run reads no file whose size and mtime are unchanged and converts only
    files whose bytes (or the conversion parameters) changed, and no file moves between splits.

    Args:
        cfg: What to prepare and where (see :class:`PrepareConfig`).

    Returns:
        The report and the exit status (0; 1 if nothing usable remains, in which case no manifest or preset is
        written, or if ``strict`` and a file was rejected).

    Raises:
        DatasetError: Invalid arguments, or the output folder is in use by another run.
    """
    cfg = cfg.resolved()
    out_dir = Path(cfg.out_dir)  # type: ignore[arg-type]
    wav_dir = out_dir / WAV_SUBDIR
    wav_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        remove_temp_files(out_dir, wav_dir)  # temp files of a run that crashed
        return _prepare_locked(cfg, out_dir, wav_dir)


def _prepare_locked(cfg: PrepareConfig, out_dir: Path, wav_dir: Path) -> PrepareResult:
    """The steps of :func:`prepare`, run while this process holds the output folder's lock."""
    params = conversion_params(cfg.min_seconds, cfg.max_seconds)
    sources, issues, facts = discover(cfg)
    state_path = out_dir / STATE_FILE
    state = load_state(state_path)
    tasks = make_tasks(sources, state, wav_dir, params, cfg.captions_from)
    records, captions, converted = _convert_all(cfg, tasks, state_path, issues)
    stale_removed = remove_stale_outputs(wav_dir, {r: rec for r, rec in records.items() if rec['status'] == 'kept'})
    kept, duplicates = _keep_once(records, captions, issues)
    previous = {rel: r['split'] for rel, r in state.items() if r.get('split')}
    name_rels = {s.rel: s.name_rel for s in sources if s.rel in kept}
    caption_text = {rel: _first(captions[rel][0]) for rel in kept}
    splits = assign_splits(families(name_rels, caption_text), cfg.valid_fraction, previous)
    for rel, rec in records.items():
        rec['split'] = splits.get(rel)
    entries = manifest_entries(kept, splits, wav_dir)
    durations = clip_durations(kept)
    if kept:
        egs_dir = Path(cfg.egs_root) / cfg.name  # type: ignore[arg-type]
        manifests = write_manifests(egs_dir, entries)
        preset, notes = _write_dataset_preset(cfg, egs_dir, durations, has_valid=bool(entries['valid']))
    else:  # nothing half-written: a preset and manifests without clips would only fail later, in training
        manifests, preset, notes = {}, {}, ['No usable file: no manifest or preset was written.']
    write_state(state_path, records)  # compact the journal to the current sources

    sort_issues(issues)
    if len(kept) == 1:
        notes.append('Only one usable file: the valid split is empty. Add more files.')
    totals = report_totals(issues, kept, len(records), converted, stale_removed, durations, entries)
    totals['duplicate_files'] = len(duplicates)
    report = build_report(
        cfg,
        facts=facts,
        params=params,
        totals=totals,
        durations=durations,
        splits=splits,
        manifests=manifests,
        preset=preset,
        notes=notes,
        issues=issues,
        captions={rel: captions[rel] for rel in sorted(kept)},
        duplicates=duplicates,
    )
    write_report(out_dir, report)
    return PrepareResult(report, _exit_code(cfg, kept, issues))


def _first(caption: str | list[str]) -> str:
    return caption if isinstance(caption, str) else caption[0]


def _keep_once(
    records: dict[str, dict[str, Any]], captions: dict[str, tuple[str | list[str], str]], issues: list[Issue]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The captioned files kept, each audio once; duplicates and long captions are reported in ``issues``.

    Returns:
        ``{rel: record}`` of the kept files, and ``{duplicate: the file kept instead}``.
    """
    duplicates = find_duplicates({rel: records[rel].get('pcm') for rel in captions})
    for dup, original in duplicates.items():
        issues.append(Issue(dup, INFO, 'duplicate', f'the same audio as {original}, which is kept; this copy is not'))
    kept = {rel: records[rel] for rel in sorted(captions) if rel not in duplicates}
    for rel in kept:
        caption = captions[rel][0]
        chars = len(caption) if isinstance(caption, str) else max(map(len, caption))
        if chars > LONG_CAPTION_CHARS:
            issues.append(Issue(rel, FLAGGED, 'long_caption', f'caption has {chars} characters'))
    return kept, duplicates


def _convert_all(
    cfg: PrepareConfig, tasks: list[ConvertTask], state_path: Path, issues: list[Issue]
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str | list[str], str]], int]:
    """Run the conversions with a progress bar, journaling each file converted as soon as it is done.

    Returns:
        The state records of the sources that could be read, by relative path; ``{rel: (caption, source)}`` of the
        usable ones; and how many were converted this run. The issues found are appended to ``issues``.
    """
    from tqdm import tqdm

    records: dict[str, dict[str, Any]] = {}
    captions: dict[str, tuple[str | list[str], str]] = {}
    converted = 0
    with open(state_path, 'ab') as journal:
        bar = tqdm(
            total=len(tasks), unit='file', desc=f'prepare {cfg.name}', disable=None if cfg.progress else True
        )  # None: only on a terminal
        for res in iter_results(tasks, cfg.workers):
            bar.update(1)
            issues.extend(res.issues)
            converted += res.converted
            if res.record is None:
                continue
            records[res.rel] = res.record
            if res.caption is not None and res.caption_source is not None:
                captions[res.rel] = (res.caption, res.caption_source)
            if res.converted:
                append_record(journal, res.record)
        bar.close()
    return records, captions, converted


def _write_dataset_preset(
    cfg: PrepareConfig, egs_dir: Path, durations: list[float], has_valid: bool
) -> tuple[dict[str, Any], list[str]]:
    """Write ``config/dataset/<name>.yaml`` with settings from the clips and prompts from the manifests' captions.

    Returns:
        The report's ``preset`` entry, and the notes for the user (one if an edited preset was kept).
    """
    ref = manifest_ref(egs_dir)
    preset_path = Path(cfg.config_root) / f'{cfg.name}.yaml'  # type: ignore[arg-type]
    captions = manifest_captions(egs_dir / 'valid', 4) if has_valid else []
    captions += [c for c in manifest_captions(egs_dir / 'train', 4) if c not in captions]
    settings = preset_settings(durations, captions)
    body = preset_text(cfg.name, Path(cfg.dataset_dir), ref, settings)  # type: ignore[arg-type]
    action, note = write_preset(preset_path, body, cfg.force)
    return {'path': str(preset_path), 'action': action, **asdict(settings)}, [note] if note else []


def _exit_code(cfg: PrepareConfig, kept: dict[str, dict[str, Any]], issues: list[Issue]) -> int:
    """1 if nothing usable remains, or with ``strict`` if anything was rejected; else 0."""
    if not kept:
        return 1
    if cfg.strict and any(i.status == REJECTED for i in issues):
        return 1
    return 0
