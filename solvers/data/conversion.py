"""Conversion of one source file (decode, check, downmix, resample, cut, encode) and the pool that runs it."""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from solvers import atomic
from solvers.data.captions import resolve_caption
from solvers.data.config import CAPTION_SOURCES, SAMPLE_RATE, _hash_text
from solvers.data.discovery import Source
from solvers.data.report import FLAGGED, INFO, REJECTED, Issue
from solvers.data.state import STATE_VERSION
from solvers.data.tags import read_tags

# Worker processes import this module: keep it free of torch/audiocraft imports (they cost seconds).

SILENCE_PEAK = 10 ** (-60 / 20)  # peak under -60 dBFS: nothing a model could learn from
CLIP_LEVEL = 0.999  # |sample| at or above this is counted as sitting on full scale
CLIP_REJECT_FRACTION = 0.01  # > 1 % of samples on full scale: audibly distorted, rejected
CLIP_FLAG_FRACTION = 0.001  # > 0.1 %: kept but flagged
METADATA_DURATION_TOLERANCE = 0.1  # seconds (or 1 %, whichever is larger) before a metadata duration is "wrong"


@dataclass
class ConvertTask:
    """What a worker needs to convert (or re-check) one source file."""

    source: Source
    wav_dir: str
    params: dict[str, Any]
    previous: dict[str, Any] | None = None  # state record of the last run, only if its parameters match
    unchanged: bool = False  # the file's size and mtime are those of ``previous``: reuse it without reading the file
    captions_from: tuple[str, ...] = CAPTION_SOURCES


@dataclass
class ConvertResult:
    """A worker's answer: the new state record, the issues found, and the caption with its source."""

    rel: str
    record: dict[str, Any] | None
    issues: list[Issue]
    converted: bool
    caption: str | list[str] | None = None  # None: the file is not usable (rejected audio, or no caption)
    caption_source: str | None = None


class _Rejected(Exception):
    """Raised by a conversion step: the file is rejected with ``code`` for ``reason``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def conversion_params(min_seconds: float, max_seconds: float) -> dict[str, Any]:
    """What a conversion depends on, plus its ``fingerprint``: a state record made with other parameters is stale."""
    params: dict[str, Any] = {
        'sample_rate': SAMPLE_RATE,
        'min_seconds': min_seconds,
        'max_seconds': max_seconds,
        'silence_peak': SILENCE_PEAK,
        'clip': [CLIP_LEVEL, CLIP_FLAG_FRACTION, CLIP_REJECT_FRACTION],
        'version': STATE_VERSION,
    }
    params['fingerprint'] = _hash_text(json.dumps(params, sort_keys=True))
    return params


def encode_wav_pcm16(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode mono float samples as a canonical 44-byte-header PCM16 WAV (clipping at full scale).

    Args:
        samples: 1-D float array in [-1, 1].
        sample_rate: Sample rate written in the header.
    """
    pcm = np.clip(np.rint(samples * 32767.0), -32768, 32767).astype('<i2').tobytes()
    header = struct.pack(
        '<4sI4s4sIHHIIHH4sI',
        b'RIFF',
        36 + len(pcm),
        b'WAVE',
        b'fmt ',
        16,
        1,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b'data',
        len(pcm),
    )
    return header + pcm


def plan_chunks(
    n_samples: int, sample_rate: int, min_seconds: float, max_seconds: float
) -> tuple[list[tuple[int, int]], int]:
    """Cut ``n_samples`` into chunks no longer than ``max_seconds`` and no shorter than ``min_seconds``.

    A long file is cut into ``k = ceil(length / max)`` equal chunks, so there is no short trailing remainder
    (each chunk is at least ``max / 2``). Only when ``min > max / 2`` can equal chunks be too short; then chunks of
    exactly ``max`` are cut and the remainder (shorter than ``min``) is dropped.

    Returns:
        ``[(start, end), ...]`` sample bounds and the number of dropped samples.
    """
    max_n = max(1, int(round(max_seconds * sample_rate)))
    min_n = int(math.ceil(min_seconds * sample_rate))
    if n_samples <= max_n:
        return [(0, n_samples)], 0
    k = -(-n_samples // max_n)
    if n_samples // k >= min_n:
        bounds = [round(i * n_samples / k) for i in range(k + 1)]
        return list(zip(bounds[:-1], bounds[1:])), 0
    k = n_samples // max_n
    return [(i * max_n, (i + 1) * max_n) for i in range(k)], n_samples - k * max_n


def _wav_truncation(data: bytes) -> tuple[int, int] | None:
    """``(declared, actual)`` byte sizes if ``data`` is a RIFF/WAVE file shorter than its header says."""
    if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
        return None
    declared = struct.unpack('<I', data[4:8])[0] + 8
    if declared in (8, 0xFFFFFFFF + 8):  # streaming writers leave the size at 0 or -1
        return None
    return (declared, len(data)) if declared > len(data) else None


def _metadata_issues(src: Source, orig_sr: int, orig_duration: float) -> list[Issue]:
    issues = []
    meta_path = src.metadata_path
    for key, actual, fmt in (('duration', orig_duration, '{:.3f} s'), ('sample_rate', orig_sr, '{} Hz')):
        if key not in src.metadata or src.metadata[key] is None:
            continue
        value = src.metadata[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            issues.append(
                Issue(
                    src.rel,
                    FLAGGED,
                    'bad_metadata_value',
                    f"'{key}' in {meta_path} is {value!r}, not a number; the audio says {fmt.format(actual)}",
                    metadata_path=meta_path,
                )
            )
            continue
        tolerance = max(METADATA_DURATION_TOLERANCE, 0.01 * actual) if key == 'duration' else 0.5
        if abs(value - actual) > tolerance:
            issues.append(
                Issue(
                    src.rel,
                    FLAGGED,
                    f'{key}_mismatch',
                    f"'{key}' in {meta_path} is {fmt.format(value)} but the audio has "
                    f'{fmt.format(actual)}; the audio wins',
                    metadata_path=meta_path,
                )
            )
    return issues


def _sidecar_bytes(src: Source, source: str, index: int, count: int, start: float) -> bytes:
    payload = {
        'description': src.caption,
        'source': src.rel,
        'chunk_index': index,
        'num_chunks': count,
        'chunk_start': round(start, 4),
        'caption_source': source,
    }
    # ASCII escapes: audiocraft opens the sidecar with the locale's default encoding, which may not be UTF-8.
    return (json.dumps(payload, ensure_ascii=True) + '\n').encode('ascii')


def _write_sidecars(src: Source, source: str, wav_dir: Path, outputs: list[dict[str, Any]]) -> None:
    for i, out in enumerate(outputs):
        path = wav_dir / (Path(out['name']).stem + '.json')
        data = _sidecar_bytes(src, source, i, len(outputs), out['start'])
        try:
            if path.read_bytes() == data:
                continue
        except OSError:
            pass
        atomic.write_bytes(path, data, sync_dir=False)  # the folder is fsynced once, after the conversion


def make_tasks(
    sources: list[Source],
    state: dict[str, dict[str, Any]],
    wav_dir: Path,
    params: dict[str, Any],
    captions_from: tuple[str, ...] = CAPTION_SOURCES,
) -> list[ConvertTask]:
    """One task per source, with the source's previous state record if it is still valid.

    A record is valid when it was made with the same parameters and output name and all its outputs are present.
    It is reused without reading the file when the file's size and modification time are unchanged and the record
    holds what this run needs (its tags, when tags are a caption source).
    """
    tasks = []
    want_tags = 'tags' in captions_from
    for src in sources:
        prev = state.get(src.rel)
        if prev is not None and (
            prev.get('params') != params['fingerprint']
            or prev.get('base') != src.base
            or any(not (wav_dir / o['name']).is_file() for o in prev.get('outputs', []))
        ):
            prev = None
        has_tags = prev is not None and (prev.get('tags') is not None or not want_tags)
        unchanged = has_tags and prev is not None and prev.get('stat') == _stat(src.path)
        tasks.append(ConvertTask(src, str(wav_dir), params, prev, unchanged, captions_from))
    return tasks


def _stat(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, what tells a re-run that it has not changed; ``None`` if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def convert_one(task: ConvertTask) -> ConvertResult:
    """Check and convert one source file, then caption it (runs in a worker process).

    A file whose size and mtime are unchanged since the last run is not read at all. Otherwise it is read once and
    hashed; its tags are parsed from the same bytes; unless the previous run converted the same bytes with the same
    parameters, it is decoded, problems are rejected or flagged, it is downmixed to mono, resampled to 16 kHz
    (libsoxr, high quality), cut into chunks and written as PCM16 WAVs. Then the caption is chosen
    (:func:`solvers.data.captions.resolve_caption`) and the caption sidecars are written atomically.

    Args:
        task: The source, the output folder, the parameters, the previous state record and the caption sources.

    Returns:
        The new state record (``None`` if the file could not be read), the issues, and the caption with its source.
    """
    src = task.source
    prev = task.previous
    if prev is not None and task.unchanged:
        return _finish(task, dict(prev), [Issue(**i) for i in prev.get('issues', [])], False)
    try:
        data = Path(src.path).read_bytes()
    except OSError as err:
        return ConvertResult(src.rel, None, [Issue(src.rel, REJECTED, 'unreadable_file', f'cannot read: {err}')], False)
    sha = hashlib.sha256(data).hexdigest()  # sha256 runs on the SHA-NI unit of modern x86: ~2x blake2b
    tags = read_tags(data) if 'tags' in task.captions_from else (prev or {}).get('tags')
    if prev is not None and prev.get('sha') == sha:
        reused = dict(prev, stat=_stat(src.path), tags=tags)
        return _finish(task, reused, [Issue(**i) for i in prev.get('issues', [])], False)

    issues: list[Issue] = []
    record: dict[str, Any] = {
        'v': STATE_VERSION,
        'rel': src.rel,
        'base': src.base,
        'sha': sha,
        'stat': _stat(src.path),
        'tags': tags,
        'pcm': None,
        'params': task.params['fingerprint'],
        'status': 'rejected',
        'outputs': [],
        'orig': None,
    }
    try:
        outputs = _convert(src, data, Path(task.wav_dir), task.params, record, issues)
    except _Rejected as rejected:
        issues.append(Issue(src.rel, REJECTED, rejected.code, rejected.reason))
        record['issues'] = [asdict(i) for i in issues]
        return ConvertResult(src.rel, record, issues, True)
    record.update(status='kept', outputs=outputs, issues=[asdict(i) for i in issues])
    return _finish(task, record, issues, True)


def _finish(task: ConvertTask, record: dict[str, Any], audio_issues: list[Issue], converted: bool) -> ConvertResult:
    """Caption a file whose audio is usable and bring its sidecars up to date; a file no source captions is rejected.

    The caption may change without the audio changing (a new caption file, another ``--captions-from``), so it is
    chosen on every run, and sidecars are rewritten only where they differ.
    """
    src = task.source
    issues = list(audio_issues)
    if record['status'] != 'kept':
        return ConvertResult(src.rel, record, issues, converted)
    caption = resolve_caption(src, record.get('tags') or {}, task.captions_from)
    if caption.problem is not None:
        issues.append(Issue(src.rel, REJECTED, *caption.problem, metadata_path=src.metadata_path))
        return ConvertResult(src.rel, record, issues, converted)
    src.caption = caption.text
    _write_sidecars(src, caption.source or '', Path(task.wav_dir), record['outputs'])
    if caption.source == 'metadata':
        issues += _metadata_issues(src, record['orig']['sample_rate'], record['orig']['duration'])
    return ConvertResult(src.rel, record, issues, converted, caption.text, caption.source)


def _convert(
    src: Source, data: bytes, wav_dir: Path, params: dict[str, Any], record: dict[str, Any], issues: list[Issue]
) -> list[dict[str, Any]]:
    """Decode ``data``, check it, make it 16 kHz mono and write its chunks and their sidecars.

    Args:
        src: The source the bytes come from.
        data: The file's bytes.
        wav_dir: Where the WAVs and sidecars go.
        params: See :func:`conversion_params`.
        record: The state record; its ``orig`` (what the file was) is filled in once decoded.
        issues: Flags are appended here.

    Returns:
        The outputs, ``[{"name", "duration", "start"}, ...]``; raises :class:`_Rejected` for a file that is not kept.
        The record's ``pcm`` is set to the hash of the prepared audio (what finds duplicates).
    """
    if not data:
        raise _Rejected('empty_file', 'zero-byte file')
    x, record['orig'] = _decode(data)
    orig_sr, channels, duration = record['orig']['sample_rate'], record['orig']['channels'], record['orig']['duration']
    if x.shape[0] == 0:
        raise _Rejected('empty_audio', 'the file decodes to zero samples')
    truncated = _wav_truncation(data)
    if truncated:
        issues.append(
            Issue(
                src.rel,
                FLAGGED,
                'truncated',
                f'header declares {truncated[0]} bytes but the file has '
                f'{truncated[1]}; kept the {duration:.2f} s present',
            )
        )
    x = _check_levels(src, x, record['orig']['subtype'], duration, params, issues)
    mono = _resample(src, _downmix(x, channels), orig_sr, issues)
    outputs, record['pcm'] = _write_chunks(src, mono, wav_dir, params, duration, issues)
    return outputs


def _decode(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a file's bytes with libsndfile: ``(frames, channels)`` float32 samples and what the file was."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as snd:
            orig_sr, channels, subtype, fmt = snd.samplerate, snd.channels, snd.subtype, snd.format
            x = snd.read(dtype='float32', always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise _Rejected('unreadable', f'libsndfile cannot decode it ({str(err).split(": ")[-1]})') from None
    duration = x.shape[0] / orig_sr if orig_sr else 0.0
    return x, {'sample_rate': orig_sr, 'channels': channels, 'duration': duration, 'format': fmt, 'subtype': subtype}


def _check_levels(
    src: Source, x: np.ndarray, subtype: str, duration: float, params: dict[str, Any], issues: list[Issue]
) -> np.ndarray:
    """Reject non-finite, silent, too short or clipped audio; scale hot float audio down; flag some clipping.

    Returns:
        The samples, scaled to -0.1 dBFS if float samples went over full scale.
    """
    # Cheap whole-array reductions first: a sum is finite unless a sample is NaN/Inf (or absurdly large, which the
    # exact count below then clears), and the clip count is only needed when the peak reaches full scale.
    if not math.isfinite(float(x.sum(dtype=np.float64))):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise _Rejected('non_finite', f'{bad} of {x.size} samples are NaN or Inf')
    peak = max(float(x.max()), -float(x.min()))
    if peak < SILENCE_PEAK:
        level = 20 * math.log10(peak) if peak > 0 else -math.inf
        raise _Rejected('silent', f'peak level {level:.1f} dBFS (threshold -60 dBFS)')
    if duration < params['min_seconds']:
        raise _Rejected('too_short', f'{duration:.2f} s is shorter than --min-seconds {params["min_seconds"]:g}')
    if peak > 1.0 and subtype in ('FLOAT', 'DOUBLE'):
        x = x * np.float32(0.99 / peak)
        issues.append(
            Issue(
                src.rel,
                FLAGGED,
                'over_full_scale',
                f'float samples reach {20 * math.log10(peak):+.1f} dBFS; scaled down by '
                f'{20 * math.log10(peak / 0.99):.1f} dB',
            )
        )
    elif peak >= CLIP_LEVEL:
        clip_fraction = float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) / x.size
        if clip_fraction > CLIP_REJECT_FRACTION:
            raise _Rejected(
                'clipped',
                f'{100 * clip_fraction:.1f} % of samples sit on full scale (limit {100 * CLIP_REJECT_FRACTION:g} %)',
            )
        if clip_fraction > CLIP_FLAG_FRACTION:
            issues.append(
                Issue(src.rel, FLAGGED, 'some_clipping', f'{100 * clip_fraction:.2f} % of samples sit on full scale')
            )
    return x


def _downmix(x: np.ndarray, channels: int) -> np.ndarray:
    """The mean of the channels; rejects a file whose channels cancel out."""
    # Summing columns is ~20x faster than x.mean(axis=1) on a (frames, 2) array, and unlike a mat-vec product it
    # does not wake OpenBLAS threads that fight the worker processes for cores.
    mono = x[:, 0].copy()
    for c in range(1, channels):
        mono += x[:, c]
    if channels > 1:
        mono *= np.float32(1.0 / channels)
    if channels > 1 and max(float(mono.max()), -float(mono.min())) < SILENCE_PEAK:
        raise _Rejected('cancels_on_downmix', f'the {channels} channels cancel out when mixed to mono')
    return mono


def _resample(src: Source, mono: np.ndarray, orig_sr: int, issues: list[Issue]) -> np.ndarray:
    """Resample to 16 kHz with libsoxr (high quality), flagging a file recorded below it."""
    if orig_sr != SAMPLE_RATE:
        mono = soxr.resample(np.ascontiguousarray(mono), orig_sr, SAMPLE_RATE, quality='HQ')
        if orig_sr < SAMPLE_RATE:
            issues.append(
                Issue(
                    src.rel,
                    FLAGGED,
                    'upsampled',
                    f'recorded at {orig_sr} Hz: upsampled, nothing above {orig_sr // 2} Hz',
                )
            )
    return mono


def _write_chunks(
    src: Source, mono: np.ndarray, wav_dir: Path, params: dict[str, Any], duration: float, issues: list[Issue]
) -> tuple[list[dict[str, Any]], str]:
    """Cut the 16 kHz samples into chunks (see :func:`plan_chunks`) and write each non-silent one as a WAV.

    Returns:
        ``[{"name", "duration", "start"}, ...]`` of the written chunks, and a hash of their PCM samples (identical
        audio under two names or in two formats has the same); raises :class:`_Rejected` if all are silent.
    """
    pcm_hash = hashlib.blake2b(digest_size=16)
    chunks, dropped = plan_chunks(len(mono), SAMPLE_RATE, params['min_seconds'], params['max_seconds'])
    if dropped:
        issues.append(
            Issue(
                src.rel,
                FLAGGED,
                'remainder_dropped',
                f'last {dropped / SAMPLE_RATE:.2f} s dropped: shorter than --min-seconds '
                f'{params["min_seconds"]:g} after cutting {params["max_seconds"]:g} s chunks',
            )
        )
    outputs = []
    for i, (start, end) in enumerate(chunks):
        piece = mono[start:end]
        if len(chunks) > 1 and max(float(piece.max()), -float(piece.min())) < SILENCE_PEAK:
            issues.append(
                Issue(
                    src.rel,
                    FLAGGED,
                    'silent_chunk',
                    f'chunk {i + 1}/{len(chunks)} ({start / SAMPLE_RATE:.1f}-{end / SAMPLE_RATE:.1f} s) '
                    'is silent and was dropped',
                )
            )
            continue
        name = f'{src.base}.wav' if len(chunks) == 1 else f'{src.base}-c{i + 1:03d}.wav'
        wav = encode_wav_pcm16(piece, SAMPLE_RATE)
        pcm_hash.update(memoryview(wav)[44:])  # the samples, after the 44-byte header
        atomic.write_bytes(wav_dir / name, wav, sync_dir=False)
        outputs.append({'name': name, 'duration': (end - start) / SAMPLE_RATE, 'start': start / SAMPLE_RATE})
    if len(chunks) > 1:
        issues.append(
            Issue(
                src.rel,
                INFO,
                'split',
                f'{duration:.1f} s split into {len(chunks)} chunks of '
                f'{(chunks[0][1] - chunks[0][0]) / SAMPLE_RATE:.1f} s',
            )
        )
    if not outputs:
        raise _Rejected('silent', 'every chunk is silent')
    return outputs, pcm_hash.hexdigest()


def iter_results(tasks: list[ConvertTask], workers: int) -> Iterator[ConvertResult]:
    """Run :func:`convert_one` on every task, in a pool of ``workers`` processes; results come in completion order."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield convert_one(task)
        return
    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
    ctx = multiprocessing.get_context(method)
    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(convert_one, tasks, chunksize=chunksize)
