"""Turn a user's captioned sound folder into 16 kHz mono WAVs, audiocraft manifests, a dataset preset and a report."""

from __future__ import annotations

import csv
import fcntl
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from . import atomic
from .errors import AudiogenError
from .project import data_root, user_config_dir

# This module is imported by worker processes: keep it free of torch/audiocraft imports (they cost seconds).

SAMPLE_RATE = 16000  # AudioGen's EnCodec runs at 16 kHz mono
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff"})  # read by libsndfile
UNSUPPORTED_EXTS = frozenset({".m4a", ".aac", ".wma", ".mp4", ".webm", ".3gp", ".amr", ".ape", ".wv"})
CAPTION_KEYS = ("description", "text", "caption")
PATH_KEYS = ("path", "file", "file_name", "filename", "audio", "audio_path", "wav")
CAPTIONS_FILE_EXTS = (".csv", ".jsonl")
SILENCE_PEAK = 10 ** (-60 / 20)  # peak under -60 dBFS: nothing a model could learn from
CLIP_LEVEL = 0.999  # |sample| at or above this is counted as sitting on full scale
CLIP_REJECT_FRACTION = 0.01  # > 1 % of samples on full scale: audibly distorted, rejected
CLIP_FLAG_FRACTION = 0.001  # > 0.1 %: kept but flagged
LONG_CAPTION_CHARS = 1000  # T5 sees ~4 characters per token; beyond ~250 tokens captions are unlike AudioGen's
METADATA_DURATION_TOLERANCE = 0.1  # seconds (or 1 %, whichever is larger) before a metadata duration is "wrong"
STATE_FILE = ".prepare_state.jsonl"
LOCK_FILE = ".prepare.lock"
WAV_SUBDIR = "wav"
STATE_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The shortest clip kept by default: two frames of the 16 kHz codec (50 Hz). AudioGen pads short segments and
# audiocraft's loader keeps clips of any length, so clicks, blips and single hits are usable training data.
MIN_SECONDS = 0.04
PRESET_MARK = "# Written by prepare_dataset (fingerprint "  # first line of generated presets; unedited: updated

JSON_TYPES = {bool: "boolean", int: "number", float: "number", dict: "object", type(None): "null"}
REJECTED = "rejected"
FLAGGED = "flagged"
INFO = "info"

FIXES: dict[str, str] = {
    "escapes_root": "Copy the file into the dataset folder instead of linking to (or naming) a path outside it.",
    "broken_symlink": "Fix the link target or delete the link.",
    "unsupported_format": "Convert it to WAV or FLAC, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`.",
    "missing_caption": "Add a caption: metadata/<same path>.json (audio/ + metadata/ layout), <file>.json beside "
                       "the audio, or a row in a captions CSV/JSONL, with a 'description', 'text' or 'caption' key.",
    "empty_caption": "Write a short description of the sound in the caption field.",
    "bad_caption": "Make the caption a string (or a list of strings).",
    "malformed_json": "Fix the JSON syntax at the line/column given (`python -m json.tool FILE` shows it).",
    "not_utf8": "Re-save the metadata file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`).",
    "bad_json_root": "The file must hold one JSON object, e.g. {\"description\": \"a dog barking\"}.",
    "unreadable_metadata": "Check that the metadata file exists and is readable.",
    "unreadable_file": "Check that the file is readable (permissions, network mount).",
    "empty_file": "The file is zero bytes: copy or export it again.",
    "unreadable": "The file is corrupt or not audio: export it again as WAV or FLAC.",
    "empty_audio": "The file holds no samples: export it again.",
    "non_finite": "The float samples contain NaN/Inf: render or export the source audio again.",
    "silent": "Delete the file or replace it with the intended recording.",
    "cancels_on_downmix": "The channels cancel out when mixed to mono (opposite polarity): invert one channel or "
                          "keep a single channel.",
    "clipped": "Export or record it again at a lower gain; heavily clipped audio teaches the model distortion.",
    "too_short": "Lower --min-seconds to keep it (the default keeps anything from 0.04 s), or merge it with "
                 "related clips.",
    "truncated": "The file is shorter than its header says (interrupted copy?): copy it again if the tail matters.",
    "some_clipping": "Kept; use a cleaner take if you have one.",
    "over_full_scale": "Kept after scaling it down to -0.1 dBFS; nothing to do.",
    "upsampled": "Kept, but it has no content above its Nyquist frequency; prefer sources recorded at >= 16 kHz.",
    "duration_mismatch": "The audio was used as is; correct or delete 'duration' in the metadata file.",
    "sample_rate_mismatch": "The audio was used as is; correct or delete 'sample_rate' in the metadata file.",
    "bad_metadata_value": "Make the field a number, or delete it.",
    "long_caption": "Kept; AudioGen's text encoder works best with a sentence or two, so consider shortening it.",
    "remainder_dropped": "Raise --max-seconds, lower --min-seconds, or trim the file.",
    "silent_chunk": "Trim the silent part of the file.",
    "orphan_metadata": "Add the matching audio file, or delete the metadata file.",
    "caption_for_missing_audio": "Fix the path in the captions file, or add the audio file.",
    "ambiguous_caption_path": "Give the path relative to the dataset folder so it names exactly one file.",
    "bad_captions_row": "Fix the row in the captions file.",
    "bad_captions_file": "Fix the captions file (UTF-8, a header with a path column and a caption column).",
    "unreadable_dir": "Check the folder permissions.",
    "split": "Nothing to do; each chunk keeps the file's caption and goes to the file's split.",
}


class DatasetError(AudiogenError):
    """A problem with the arguments or the dataset as a whole; the message says what to do."""


@dataclass
class PrepareConfig:
    """Everything :func:`prepare` needs; the CLI maps one flag to one field.

    Args:
        dataset_dir: The user's folder (read only).
        name: Dataset name: ``egs/<name>/``, ``config/dataset/<name>.yaml``, ``data/<name>/``.
        out_dir: Where prepared WAVs and the report go (default ``<data root>/data/<name>``).
        egs_root: Root of the manifests (default ``<data root>/egs``).
        config_root: Folder of the ``dataset`` config group (default ``<data root>/config/dataset``); the data
            root is ``$AUDIOGEN_HOME``, else the project clone (see :mod:`solvers.project`).
        captions: Captions CSV/JSONL; by default top-level ``*.csv``/``*.jsonl`` files of the dataset are used.
        valid_fraction: Share of source files that go to the valid split.
        workers: Worker processes; 1 converts in this process.
        min_seconds: Shorter clips are rejected.
        max_seconds: Longer clips are split into chunks.
        strict: Exit non-zero if any file is rejected.
        force: Overwrite an existing preset that differs from the one this run would write.
        progress: Show a progress bar (only on a terminal).
    """

    dataset_dir: Path
    name: str
    out_dir: Path | None = None
    egs_root: Path | None = None
    config_root: Path | None = None
    captions: Path | None = None
    valid_fraction: float = 0.1
    workers: int = 1
    min_seconds: float = MIN_SECONDS
    max_seconds: float = 30.0
    strict: bool = False
    force: bool = False
    progress: bool = True

    def resolved(self) -> PrepareConfig:
        """Return a copy with defaults filled in and paths made absolute; raise :class:`DatasetError` if invalid."""
        if not NAME_RE.match(self.name):
            raise DatasetError(f"--name {self.name!r} is not usable as a file and config name: use letters, digits, "
                               "'_' and '-' only, starting with a letter or digit (e.g. --name my_sounds).")
        if not 0.0 < self.valid_fraction < 1.0:
            raise DatasetError(f"--valid-fraction must be between 0 and 1 (exclusive), got {self.valid_fraction}.")
        if self.min_seconds <= 0 or self.max_seconds <= 0 or self.min_seconds > self.max_seconds:
            raise DatasetError(f"--min-seconds ({self.min_seconds}) and --max-seconds ({self.max_seconds}) must be "
                               "positive with min <= max.")
        if self.workers < 1:
            raise DatasetError(f"--workers must be at least 1, got {self.workers}.")
        dataset_dir = Path(self.dataset_dir).expanduser().absolute()
        if not dataset_dir.is_dir():
            raise DatasetError(f"Dataset folder {dataset_dir} does not exist or is not a folder: pass the folder "
                               "that holds your audio (and metadata/ or captions).")
        out_dir = Path(self.out_dir or data_root() / "data" / self.name).expanduser().absolute()
        real_data, real_out = os.path.realpath(dataset_dir), os.path.realpath(out_dir)
        if _is_within(real_out, real_data) or _is_within(real_data, real_out):
            raise DatasetError(f"Output folder {out_dir} and dataset folder {dataset_dir} overlap; the input must stay "
                               "untouched and outputs must not be rescanned: pass --out somewhere else.")
        captions = Path(self.captions).expanduser().absolute() if self.captions else None
        if captions is not None and not captions.is_file():
            raise DatasetError(f"Captions file {captions} does not exist: check the --captions path.")
        return PrepareConfig(
            dataset_dir=dataset_dir, name=self.name, out_dir=out_dir,
            egs_root=Path(self.egs_root or data_root() / "egs").expanduser().absolute(),
            config_root=Path(self.config_root or user_config_dir() / "dataset").expanduser().absolute(),
            captions=captions, valid_fraction=self.valid_fraction, workers=self.workers,
            min_seconds=self.min_seconds, max_seconds=self.max_seconds, strict=self.strict, force=self.force,
            progress=self.progress)


@dataclass
class Issue:
    """One row of the report: a rejected or flagged file, why, and what to do about it."""

    path: str
    status: str
    code: str
    reason: str
    fix: str = ""
    metadata_path: str | None = None

    def __post_init__(self) -> None:
        if not self.fix:
            self.fix = FIXES.get(self.code, "")


@dataclass
class Source:
    """An audio file of the dataset with its caption (or the reason it has none)."""

    rel: str  # path relative to the dataset folder, POSIX separators
    path: str  # absolute path
    base: str  # output name stem, unique per source
    caption: str | list[str] | None = None
    metadata_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConvertTask:
    """What a worker needs to convert (or re-check) one source file."""

    source: Source
    wav_dir: str
    params: dict[str, Any]
    previous: dict[str, Any] | None = None  # state record of the last run, only if its parameters match


@dataclass
class ConvertResult:
    """A worker's answer: the new state record and the issues found."""

    rel: str
    record: dict[str, Any] | None
    issues: list[Issue]
    converted: bool


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _hash_text(text: str, size: int = 8) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def encode_wav_pcm16(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode mono float samples as a canonical 44-byte-header PCM16 WAV (clipping at full scale).

    Args:
        samples: 1-D float array in [-1, 1].
        sample_rate: Sample rate written in the header.
    """
    pcm = np.clip(np.rint(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                         sample_rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


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
    text = unicodedata.normalize("NFC", value)
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    text = " ".join(text.split())
    return text or None


def plan_chunks(n_samples: int, sample_rate: int, min_seconds: float, max_seconds: float
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
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    declared = struct.unpack("<I", data[4:8])[0] + 8
    if declared in (8, 0xFFFFFFFF + 8):  # streaming writers leave the size at 0 or -1
        return None
    return (declared, len(data)) if declared > len(data) else None


# ----------------------------------------------------------------------------------------------------------------------
# Worker: convert one file


def _metadata_issues(src: Source, orig_sr: int, orig_duration: float) -> list[Issue]:
    issues = []
    meta_path = src.metadata_path
    for key, actual, fmt in (("duration", orig_duration, "{:.3f} s"), ("sample_rate", orig_sr, "{} Hz")):
        if key not in src.metadata or src.metadata[key] is None:
            continue
        value = src.metadata[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            issues.append(Issue(src.rel, FLAGGED, "bad_metadata_value",
                                f"'{key}' in {meta_path} is {value!r}, not a number; the audio says "
                                f"{fmt.format(actual)}", metadata_path=meta_path))
            continue
        tolerance = max(METADATA_DURATION_TOLERANCE, 0.01 * actual) if key == "duration" else 0.5
        if abs(value - actual) > tolerance:
            issues.append(Issue(src.rel, FLAGGED, f"{key}_mismatch",
                                f"'{key}' in {meta_path} is {fmt.format(value)} but the audio has "
                                f"{fmt.format(actual)}; the audio wins", metadata_path=meta_path))
    return issues


def _sidecar_bytes(src: Source, index: int, count: int, start: float) -> bytes:
    payload = {"description": src.caption, "source": src.rel, "chunk_index": index, "num_chunks": count,
               "chunk_start": round(start, 4)}
    # ASCII escapes: audiocraft opens the sidecar with the locale's default encoding, which may not be UTF-8.
    return (json.dumps(payload, ensure_ascii=True) + "\n").encode("ascii")


def _write_sidecars(src: Source, wav_dir: Path, outputs: list[dict[str, Any]]) -> None:
    for i, out in enumerate(outputs):
        path = wav_dir / (Path(out["name"]).stem + ".json")
        data = _sidecar_bytes(src, i, len(outputs), out["start"])
        try:
            if path.read_bytes() == data:
                continue
        except OSError:
            pass
        atomic.write_bytes(path, data, sync_dir=False)  # the folder is fsynced once, after the conversion


def convert_one(task: ConvertTask) -> ConvertResult:
    """Check and convert one source file (runs in a worker process).

    Reads the file once, hashes it, and, unless the previous run converted the same bytes with the same
    parameters, decodes it, rejects or flags problems, downmixes to mono, resamples to 16 kHz (libsoxr, high
    quality), cuts long files into chunks and writes PCM16 WAVs plus the caption sidecars atomically.

    Args:
        task: The source, the output folder, the parameters and the previous state record.

    Returns:
        The new state record (``None`` if the file could not be read) and the issues.
    """
    src = task.source
    wav_dir = Path(task.wav_dir)
    params = task.params
    try:
        data = Path(src.path).read_bytes()
    except OSError as err:
        return ConvertResult(src.rel, None, [Issue(src.rel, REJECTED, "unreadable_file", f"cannot read: {err}")],
                             False)
    sha = hashlib.sha256(data).hexdigest()  # sha256 runs on the SHA-NI unit of modern x86: ~2x blake2b
    prev = task.previous
    if prev is not None and prev.get("sha") == sha:
        audio_issues = [Issue(**i) for i in prev.get("issues", [])]
        if prev["status"] == "kept":
            _write_sidecars(src, wav_dir, prev["outputs"])
            audio_issues += _metadata_issues(src, prev["orig"]["sample_rate"], prev["orig"]["duration"])
        return ConvertResult(src.rel, dict(prev), audio_issues, False)

    issues: list[Issue] = []
    record: dict[str, Any] = {"v": STATE_VERSION, "rel": src.rel, "base": src.base, "sha": sha,
                              "params": params["fingerprint"], "status": "rejected", "outputs": [], "orig": None}

    def reject(code: str, reason: str) -> ConvertResult:
        issues.append(Issue(src.rel, REJECTED, code, reason))
        record["issues"] = [asdict(i) for i in issues]
        return ConvertResult(src.rel, record, issues, True)

    if not data:
        return reject("empty_file", "zero-byte file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as snd:
            orig_sr, channels, subtype, fmt = snd.samplerate, snd.channels, snd.subtype, snd.format
            x = snd.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as err:
        return reject("unreadable", f"libsndfile cannot decode it ({str(err).split(': ')[-1]})")
    frames = x.shape[0]
    duration = frames / orig_sr if orig_sr else 0.0
    record["orig"] = {"sample_rate": orig_sr, "channels": channels, "duration": duration, "format": fmt,
                      "subtype": subtype}
    if frames == 0:
        return reject("empty_audio", "the file decodes to zero samples")
    truncated = _wav_truncation(data)
    if truncated:
        issues.append(Issue(src.rel, FLAGGED, "truncated", f"header declares {truncated[0]} bytes but the file has "
                                                           f"{truncated[1]}; kept the {duration:.2f} s present"))
    # Cheap whole-array reductions first: a sum is finite unless a sample is NaN/Inf (or absurdly large, which the
    # exact count below then clears), and the clip count is only needed when the peak reaches full scale.
    if not math.isfinite(float(x.sum(dtype=np.float64))):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            return reject("non_finite", f"{bad} of {x.size} samples are NaN or Inf")
    peak = max(float(x.max()), -float(x.min()))
    if peak < SILENCE_PEAK:
        level = 20 * math.log10(peak) if peak > 0 else -math.inf
        return reject("silent", f"peak level {level:.1f} dBFS (threshold -60 dBFS)")
    if duration < params["min_seconds"]:
        return reject("too_short", f"{duration:.2f} s is shorter than --min-seconds {params['min_seconds']:g}")
    if peak > 1.0 and subtype in ("FLOAT", "DOUBLE"):
        x = x * np.float32(0.99 / peak)
        issues.append(Issue(src.rel, FLAGGED, "over_full_scale",
                            f"float samples reach {20 * math.log10(peak):+.1f} dBFS; scaled down by "
                            f"{20 * math.log10(peak / 0.99):.1f} dB"))
    elif peak >= CLIP_LEVEL:
        clip_fraction = float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) / x.size
        if clip_fraction > CLIP_REJECT_FRACTION:
            return reject("clipped", f"{100 * clip_fraction:.1f} % of samples sit on full scale (limit "
                                     f"{100 * CLIP_REJECT_FRACTION:g} %)")
        if clip_fraction > CLIP_FLAG_FRACTION:
            issues.append(Issue(src.rel, FLAGGED, "some_clipping",
                                f"{100 * clip_fraction:.2f} % of samples sit on full scale"))
    # Summing columns is ~20x faster than x.mean(axis=1) on a (frames, 2) array, and unlike a mat-vec product it
    # does not wake OpenBLAS threads that fight the worker processes for cores.
    mono = x[:, 0].copy()
    for c in range(1, channels):
        mono += x[:, c]
    if channels > 1:
        mono *= np.float32(1.0 / channels)
    if channels > 1 and max(float(mono.max()), -float(mono.min())) < SILENCE_PEAK:
        return reject("cancels_on_downmix", f"the {channels} channels cancel out when mixed to mono")
    if orig_sr != SAMPLE_RATE:
        mono = soxr.resample(np.ascontiguousarray(mono), orig_sr, SAMPLE_RATE, quality="HQ")
        if orig_sr < SAMPLE_RATE:
            issues.append(Issue(src.rel, FLAGGED, "upsampled",
                                f"recorded at {orig_sr} Hz: upsampled, nothing above {orig_sr // 2} Hz"))
    chunks, dropped = plan_chunks(len(mono), SAMPLE_RATE, params["min_seconds"], params["max_seconds"])
    if dropped:
        issues.append(Issue(src.rel, FLAGGED, "remainder_dropped",
                            f"last {dropped / SAMPLE_RATE:.2f} s dropped: shorter than --min-seconds "
                            f"{params['min_seconds']:g} after cutting {params['max_seconds']:g} s chunks"))
    outputs = []
    for i, (start, end) in enumerate(chunks):
        piece = mono[start:end]
        if len(chunks) > 1 and max(float(piece.max()), -float(piece.min())) < SILENCE_PEAK:
            issues.append(Issue(src.rel, FLAGGED, "silent_chunk",
                                f"chunk {i + 1}/{len(chunks)} ({start / SAMPLE_RATE:.1f}-{end / SAMPLE_RATE:.1f} s) "
                                "is silent and was dropped"))
            continue
        name = f"{src.base}.wav" if len(chunks) == 1 else f"{src.base}-c{i + 1:03d}.wav"
        atomic.write_bytes(wav_dir / name, encode_wav_pcm16(piece, SAMPLE_RATE), sync_dir=False)
        outputs.append({"name": name, "duration": (end - start) / SAMPLE_RATE, "start": start / SAMPLE_RATE})
    if len(chunks) > 1:
        issues.append(Issue(src.rel, INFO, "split", f"{duration:.1f} s split into {len(chunks)} chunks of "
                                                    f"{(chunks[0][1] - chunks[0][0]) / SAMPLE_RATE:.1f} s"))
    if not outputs:
        return reject("silent", "every chunk is silent")
    _write_sidecars(src, wav_dir, outputs)
    record.update(status="kept", outputs=outputs, issues=[asdict(i) for i in issues])
    return ConvertResult(src.rel, record, issues + _metadata_issues(src, orig_sr, duration), True)


# ----------------------------------------------------------------------------------------------------------------------
# Discovery: files, layouts, captions


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
            issues.append(Issue(folder.relative_to(root).as_posix() or ".", REJECTED, "unreadable_dir", str(err)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                hidden += 1
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_symlink():
                real = os.path.realpath(path)
                if not os.path.exists(real):
                    issues.append(Issue(rel, REJECTED, "broken_symlink", f"symlink to missing {os.readlink(path)}"))
                    continue
                if not _is_within(real, real_root):
                    issues.append(Issue(rel, REJECTED, "escapes_root",
                                        f"symlink points outside the dataset folder, to {real}"))
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
        return None, ("unreadable_metadata", f"cannot read {rel}: {err.strerror}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, ("not_utf8", f"{rel} is not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, ("malformed_json", f"{rel} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})")
    if not isinstance(obj, dict):
        return None, ("bad_json_root", f"{rel} holds a JSON {type(obj).__name__}, not an object")
    return obj, None


def caption_from_object(obj: dict[str, Any], where: str) -> tuple[str | list[str] | None, tuple[str, str] | None]:
    """Pick the caption out of a metadata object (``description``, ``text`` or ``caption``, then ``caption_N``).

    Returns:
        The cleaned caption, or ``None`` and ``(code, reason)``.
    """
    keys = [k for k in CAPTION_KEYS if k in obj] + sorted(k for k in obj if re.fullmatch(r"caption_\d+", str(k)))
    if not keys:
        return None, ("missing_caption", f"{where} has no 'description', 'text' or 'caption' key")
    captions: list[str] = []
    for key in keys:
        try:
            value = clean_caption(obj[key])
        except TypeError:
            kind = JSON_TYPES.get(type(obj[key]), type(obj[key]).__name__)
            return None, ("bad_caption", f"'{key}' in {where} is a JSON {kind} ({str(obj[key])[:40]}), not text")
        if isinstance(value, str):
            captions.append(value)
        elif value:
            captions.extend(value)
    captions = list(dict.fromkeys(captions))
    if not captions:
        return None, ("empty_caption", f"the caption in {where} is empty or whitespace")
    return (captions[0] if len(captions) == 1 else captions), None


def _lower_keys(row: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in row.items() if k is not None}


def read_captions_file(path: Path, rel: str, issues: list[Issue]) -> list[tuple[str, dict[str, Any], str]]:
    """Read a CSV (header row) or JSONL captions file.

    Returns:
        ``[(audio path as written, row, "file:line"), ...]``; problems are appended to ``issues``.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        issues.append(Issue(rel, REJECTED, "bad_captions_file", f"{rel} is not UTF-8 (offset {err.start})"))
        return []
    except OSError as err:
        issues.append(Issue(rel, REJECTED, "bad_captions_file", f"cannot read {rel}: {err.strerror}"))
        return []
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                issues.append(Issue(f"{rel}:{lineno}", REJECTED, "bad_captions_row", f"invalid JSON: {err.msg}"))
                continue
            if not isinstance(obj, dict):
                issues.append(Issue(f"{rel}:{lineno}", REJECTED, "bad_captions_row", "line is not a JSON object"))
                continue
            rows.append((lineno, _lower_keys(obj)))
    else:
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel  # type: ignore[assignment]
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        try:
            rows = [(reader.line_num, _lower_keys(row)) for row in reader]
        except csv.Error as err:
            issues.append(Issue(rel, REJECTED, "bad_captions_file", f"{rel}: {err}"))
            return []
    out = []
    for lineno, row in rows:
        where = f"{rel}:{lineno}"
        key = next((k for k in PATH_KEYS if k in row and str(row[k] or "").strip()), None)
        if key is None:
            issues.append(Issue(where, REJECTED, "bad_captions_row",
                                f"no audio path (expected a column named one of {', '.join(PATH_KEYS)})"))
            continue
        out.append((str(row[key]).strip(), row, where))
    return out


def _flat_name(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    flat = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem.replace("/", "__")).strip("._") or "audio"
    return flat[:100]


def _match_caption_path(written: str, root: Path, cdir: str, by_rel: dict[str, str], by_stem: dict[str, list[str]],
                        by_name: dict[str, list[str]]) -> tuple[list[str], bool]:
    """Audio files a captions-file path names: relative to the dataset, then to the captions file, then by name.

    Returns:
        The matching relative paths, and whether the path pointed outside the dataset folder.
    """
    norm = written.replace("\\", "/")
    escaped = False
    for base in dict.fromkeys([".", cdir]):
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
    return by_name.get(norm.rsplit("/", 1)[-1], []), False


def discover(cfg: PrepareConfig) -> tuple[list[Source], list[Issue], dict[str, Any]]:
    """Find the audio files of the dataset and their captions, whatever the layout.

    A file's caption comes from the first of: a captions CSV/JSONL row, ``metadata/<path under audio/>.json``
    (``audio/`` + ``metadata/`` layout), ``<file>.json`` beside it.

    Args:
        cfg: A resolved config.

    Returns:
        Captioned sources (sorted), issues (uncaptioned or unsafe files...), and facts for the report.
    """
    root = Path(cfg.dataset_dir)  # type: ignore[arg-type]
    issues: list[Issue] = []
    files, hidden = walk_files(root, issues)
    split_layout = (root / "audio").is_dir() and (root / "metadata").is_dir()
    audio: list[tuple[str, Path]] = []
    jsons: dict[str, Path] = {}
    for rel, path in files:
        ext = path.suffix.lower()
        if ext in AUDIO_EXTS:
            audio.append((rel, path))
        elif ext in UNSUPPORTED_EXTS:
            issues.append(Issue(rel, REJECTED, "unsupported_format", f"'{ext}' files cannot be decoded without ffmpeg"))
        elif ext == ".json":
            jsons[rel] = path

    # Captions files: explicit, or top-level CSV/JSONL files of the dataset.
    if cfg.captions is not None:
        caption_files = [(os.path.relpath(cfg.captions, root), Path(cfg.captions))]
    else:
        caption_files = [(rel, p) for rel, p in files if "/" not in rel and p.suffix.lower() in CAPTIONS_FILE_EXTS]
    by_rel = {rel: rel for rel, _ in audio}
    by_stem: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for rel, _ in audio:
        by_stem.setdefault(rel.rsplit(".", 1)[0], []).append(rel)
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)
        by_name.setdefault(rel.rsplit("/", 1)[-1].rsplit(".", 1)[0], []).append(rel)
    row_captions: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for crel, cpath in caption_files:
        cdir = os.path.relpath(cpath.parent, root)
        for written, row, where in read_captions_file(cpath, crel, issues):
            candidates, escaped = _match_caption_path(written, root, cdir, by_rel, by_stem, by_name)
            if escaped and not candidates:
                issues.append(Issue(where, REJECTED, "escapes_root", f"'{written}' points outside the dataset folder"))
            elif len(candidates) != 1:
                code = "ambiguous_caption_path" if candidates else "caption_for_missing_audio"
                detail = f"matches {len(candidates)} files" if candidates else "matches no audio file"
                issues.append(Issue(where, FLAGGED, code, f"'{written}' {detail}"))
            else:
                row_captions.setdefault(candidates[0], []).append((row, where))

    sources: list[Source] = []
    used_json: set[str] = set()
    bases: dict[str, str] = {}
    for rel, path in audio:
        name_rel = rel[len("audio/"):] if split_layout and rel.startswith("audio/") else rel
        base = f"{_flat_name(name_rel)}-{_hash_text(rel, 4)}"
        if base in bases:  # same flattened name and same 32-bit hash: astronomically unlikely, but never overwrite
            base = f"{base}-{_hash_text(rel, 8)}"
        bases[base] = rel
        src = Source(rel=rel, path=str(path), base=base)
        problem: tuple[str, str] | None = None
        if rel in row_captions:
            entries = row_captions[rel]
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
        else:
            meta_rel = None
            stem = rel.rsplit(".", 1)[0]
            if split_layout and rel.startswith("audio/"):
                mirrored = "metadata/" + stem[len("audio/"):] + ".json"
                meta_rel = mirrored if mirrored in jsons else None
            if meta_rel is None and stem + ".json" in jsons:
                meta_rel = stem + ".json"
            if meta_rel is None:
                looked = ["a captions file row"] if caption_files else []
                if split_layout and rel.startswith("audio/"):
                    looked.append(f"metadata/{stem[len('audio/'):]}.json")
                looked.append(f"{stem}.json")
                problem = ("missing_caption", f"no caption found (looked for {', '.join(looked)})")
            else:
                used_json.add(meta_rel)
                src.metadata_path = meta_rel
                obj, problem = read_json_object(jsons[meta_rel], meta_rel)
                if obj is not None:
                    src.metadata = obj
                    src.caption, problem = caption_from_object(obj, meta_rel)
        if problem is not None:
            issues.append(Issue(rel, REJECTED, problem[0], problem[1], metadata_path=src.metadata_path))
            continue
        caption_chars = len(src.caption) if isinstance(src.caption, str) else max(map(len, src.caption or [""]))
        if caption_chars > LONG_CAPTION_CHARS:
            issues.append(Issue(rel, FLAGGED, "long_caption", f"caption has {caption_chars} characters",
                                metadata_path=src.metadata_path))
        sources.append(src)

    for rel in sorted(set(jsons) - used_json):
        if "/" in rel:  # top-level JSON files are often dataset cards, not per-file metadata
            issues.append(Issue(rel, FLAGGED, "orphan_metadata", "no audio file uses this metadata file"))
    facts = {
        "layout": ("captions file" if caption_files else "audio/ + metadata/" if split_layout else "sidecar JSON"),
        "captions_files": [c for c, _ in caption_files],
        "hidden_skipped": hidden,
    }
    return sources, issues, facts


# ----------------------------------------------------------------------------------------------------------------------
# Split, manifests, preset, report


def split_of(rel: str, valid_fraction: float) -> str:
    """Deterministic split of a source file from a hash of its relative path (stable as files are added)."""
    return "valid" if _split_key(rel) < valid_fraction else "train"


def _split_key(rel: str) -> float:
    return int(_hash_text(rel, 8), 16) / 2**64


def assign_splits(rels: Iterable[str], valid_fraction: float) -> dict[str, str]:
    """Split source files by hash; with two or more files both splits are made non-empty.

    Args:
        rels: Relative paths of the kept source files.
        valid_fraction: Target share of the valid split.

    Returns:
        ``{rel: "train" | "valid"}``.
    """
    rels = sorted(rels, key=_split_key)
    splits = {rel: split_of(rel, valid_fraction) for rel in rels}
    if len(rels) >= 2:
        if "valid" not in splits.values():
            splits[rels[0]] = "valid"  # the file whose hash is closest to the valid range
        if "train" not in splits.values():
            splits[rels[-1]] = "train"
    return splits


def manifest_bytes(entries: list[dict[str, Any]]) -> bytes:
    """Gzipped audiocraft ``AudioMeta`` JSON lines, byte-identical for identical entries (gzip mtime 0)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for e in sorted(entries, key=lambda e: e["path"]):
            gz.write((json.dumps(e) + "\n").encode("utf-8"))
    return buf.getvalue()


def read_manifest(split_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a split's manifest (``<split_dir>/data.jsonl.gz`` or ``data.jsonl``, or that file itself).

    Raises:
        DatasetError: the manifest is missing or unreadable, naming the path and how to make it.
    """
    path = Path(split_dir)
    if path.is_dir():
        path = next((path / n for n in ("data.jsonl.gz", "data.jsonl") if (path / n).is_file()), path / "data.jsonl.gz")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"Cannot read the manifest {path} ({err}). Prepare the dataset with "
            "`python -m scripts.prepare_dataset DIR --name NAME`, then pass dataset=NAME.") from err


def manifest_captions(split_dir: str | os.PathLike, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions of a split, in manifest order, from the JSON beside each clip."""
    captions: list[str] = []
    for entry in read_manifest(split_dir):
        if len(captions) >= limit:
            break
        try:
            info = json.loads(Path(entry["path"]).with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        text = info.get("description")
        text = text[0] if isinstance(text, list) and text else text
        if isinstance(text, str) and text.strip() and text not in captions:
            captions.append(text)
    return captions


@dataclass
class PresetSettings:
    """What a prepared preset takes from the data and the machine (see :func:`preset_settings`)."""

    segment_duration: float
    num_workers: int
    prompts: list[str]
    sample_duration: float


def preset_settings(durations: list[float], captions: list[str], cpus: int | None = None) -> PresetSettings:
    """Segment length from the clips, loader workers from the machine, sample prompts from the captions.

    Args:
        durations: seconds of every prepared clip.
        captions: distinct captions, valid split first (the sample prompts are the first four).
        cpus: CPU count (default: this machine's).
    """
    longest = sorted(durations)[int(0.9 * (len(durations) - 1))] if durations else 10.0
    # 90 % of clips fit a segment (rounded up to 0.5 s), between 1 s and the 10 s AudioGen was trained on.
    segment = min(10.0, max(1.0, math.ceil(longest * 2) / 2))
    cpus = cpus or os.cpu_count() or 1
    # Worker processes cost a fork and memory each; on 1-2 cores reading in the training process is faster.
    workers = 0 if cpus <= 2 else min(8, cpus // 2)
    return PresetSettings(segment, workers, captions[:4], segment)


def _yaml_string(text: str) -> str:
    """A YAML double-quoted scalar that OmegaConf won't interpolate."""
    return json.dumps(text.replace("${", "\\${"), ensure_ascii=False)


def preset_text(name: str, dataset_dir: Path, manifest_ref: str, settings: PresetSettings) -> str:
    """Hydra preset of the ``dataset`` group for a prepared dataset, without its two header lines.

    Args:
        name: Dataset name.
        dataset_dir: The user's folder (written in the header only).
        manifest_ref: ``egs/<name>`` relative to the data root, or an absolute folder.
        settings: values taken from the data and the machine.
    """
    s = settings
    prompts = "\n".join(f"    - {_yaml_string(p)}" for p in s.prompts) or "    []"
    return f"""# Dataset preset for {dataset_dir}.
# Run: dora run solver=audiogen/tiny dataset={name}      (the tiny stand-in, on a CPU)
#      dora run solver=audiogen/train dataset={name}     (facebook/audiogen-medium, on a GPU)
datasource:
  max_sample_rate: 16000
  max_channels: 1
  train: {manifest_ref}/train       # relative paths are resolved against the data root, whatever Hydra's cwd is
  valid: {manifest_ref}/valid
  evaluate: null
  generate: null         # samples come from generate.prompts, not from the data
dataset:
  segment_duration: {s.segment_duration:g}  # seconds per example: 90 % of these clips fit; shorter ones are padded
  batch_size: 8          # clips per micro-batch; x optim.grad_accum_steps = clips per update
  num_workers: {s.num_workers}         # loader processes for this machine ({os.cpu_count()} CPUs); not in the signature
  min_segment_ratio: 0.5 # a random offset keeps at least half a segment of a long clip in view
  valid:
    num_samples: null    # one segment of every valid clip
generate:
  duration: {s.sample_duration:g}          # seconds per sample, like the training segments
  prompts:               # samples after each epoch: captions of your valid clips (edit freely)
{prompts}
"""


PACKAGE_LINE = "# @package __global__\n"  # Hydra reads it only on the first line


def _preset_file(body: str) -> str:
    return f"{PACKAGE_LINE}{PRESET_MARK}{_hash_text(body)}; an edited preset is kept on re-runs)\n{body}"


def _is_unedited(text: str) -> bool:
    """True for a preset written by prepare_dataset and not changed since (its fingerprint still matches)."""
    if not text.startswith(PACKAGE_LINE):
        return False
    mark, _, body = text[len(PACKAGE_LINE):].partition("\n")
    return mark.startswith(PRESET_MARK) and mark[len(PRESET_MARK):].startswith(_hash_text(body) + ";")


def write_preset(path: Path, body: str, force: bool) -> tuple[str, str | None]:
    """Write a dataset preset unless the user edited the existing one; returns (action, note or None)."""
    text = _preset_file(body)
    old = path.read_text(encoding="utf-8", errors="replace") if path.exists() else None
    if old == text:
        return "unchanged", None
    if old is None or force or _is_unedited(old):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, text.encode("utf-8"))
        return ("written" if old is None else "overwritten (--force)" if force and not _is_unedited(old)
                else "updated"), None
    return ("kept: you edited it; --force replaces it",
            f"{path} was edited by hand and was kept; compare it with what this run would write (segments, prompts) "
            "or pass --force to replace it.")


def _histogram(durations: list[float]) -> list[dict[str, Any]]:
    edges = [0, 1, 2, 5, 10, 20, 30, 60]
    rows = []
    for lo, hi in zip(edges, edges[1:] + [math.inf]):
        n = sum(1 for d in durations if lo <= d < hi)
        rows.append({"from_s": lo, "to_s": None if hi == math.inf else hi, "count": n})
    return rows


def _issue_groups(issues: list[dict[str, Any]]) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Issues grouped by (status, code): rejected first, the biggest groups first; each with its one fix."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for issue in issues:
        groups.setdefault((issue["status"], issue["code"]), []).append(issue)
    order = {REJECTED: 0, FLAGGED: 1, INFO: 2}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 3), -len(groups[k]), k[1]))
    return [(status, code, groups[(status, code)][0]["fix"], groups[(status, code)]) for status, code in keys]


def format_report_text(report: dict[str, Any]) -> str:
    """Human-readable version of ``report.json``: totals, durations, then problems grouped by reason."""
    t = report["totals"]
    lines = [
        f"Dataset preparation report: {report['name']}",
        f"Source: {report['dataset_dir']} (layout: {report['layout']})",
        f"Output: {report['out_dir']}",
        "",
        f"Audio files found:  {t['audio_files']}",
        f"Kept:               {t['kept_files']} ({t['flagged_files']} of them flagged)",
        f"Rejected:           {t['rejected_files']} (+ {t['other_rejections']} captions rows / folders)",
        f"Decoded this run: {t['converted']}   unchanged since last run: {t['unchanged']}   "
        f"stale outputs removed: {t['stale_removed']}",
        f"Prepared clips:     {t['clips']} = {t['hours']:.3f} h "
        f"(train {t['train_clips']} clips / {t['train_hours']:.3f} h, "
        f"valid {t['valid_clips']} clips / {t['valid_hours']:.3f} h)",
        "",
        "Clip durations:",
    ]
    peak = max([r["count"] for r in report["histogram"]] + [1])
    for r in report["histogram"]:
        label = f"{r['from_s']:>3}-{r['to_s']:<3} s" if r["to_s"] is not None else f"{r['from_s']:>3}+    s"
        lines.append(f"  {label} {r['count']:6d} {'#' * round(40 * r['count'] / peak)}")
    for note in report["notes"]:
        lines.append(f"Note: {note}")
    lines.append("")
    if not report["issues"]:
        lines.append("No problems found.")
    for status, code, fix, rows in _issue_groups(report["issues"]):
        lines.append(f"[{status.upper()}] {code}: {len(rows)} file(s)")
        if fix:
            lines.append(f"  fix: {fix}")
        lines += [f"  - {i['path']}: {i['reason']}" for i in rows]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def next_commands(name: str) -> list[str]:
    """What to run after preparing ``name``: the tiny stand-in on a CPU, or medium on a GPU."""
    from .project import outputs_dir

    lines = ["Next, on this CPU with the tiny stand-in model (a few minutes):"]
    if not (outputs_dir() / "pretrained" / "tiny").is_dir():
        lines.append("  python -m scripts.make_tiny_package")
    lines += [f"  dora run solver=audiogen/tiny dataset={name}",
              "On a GPU, fine-tune facebook/audiogen-medium (README: which preset for which GPU):",
              f"  dora run solver=audiogen/train dataset={name}"]
    return lines


def format_summary(report: dict[str, Any]) -> str:
    """The few lines printed on stdout after a run: totals, where things are, rejections by reason, next steps."""
    t = report["totals"]
    preset = report["preset"]
    lines = [
        f"Prepared '{report['name']}' from {report['dataset_dir']} ({report['layout']}).",
        f"  {t['audio_files']} audio files: {t['kept_files']} kept ({t['flagged_files']} flagged), "
        f"{t['rejected_files']} rejected; converted {t['converted']}, unchanged {t['unchanged']}.",
        f"  {t['clips']} clips, {t['hours']:.3f} h: train {t['train_clips']}, valid {t['valid_clips']}.",
        f"  manifests: {report['manifests']['train']}, {report['manifests']['valid']}",
        f"  preset:    {preset['path']} ({preset['action']}; {preset['segment_duration']:g} s segments, "
        f"{preset['num_workers']} loader workers, samples of {len(preset['prompts'])} of your captions)",
        f"  report:    {Path(report['out_dir']) / 'report.txt'}",
    ]
    for status, code, fix, rows in _issue_groups(report["issues"]):
        if status == REJECTED:
            example = rows[0]["path"] + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")
            lines.append(f"  rejected {code} x{len(rows)} ({example}): {fix}")
    lines += [f"  note: {n}" for n in report["notes"]]
    if t["kept_files"]:
        lines += next_commands(report["name"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# State journal


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """Read the state journal; the last record of each source wins and a torn last line is ignored."""
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("v") == STATE_VERSION and "rel" in rec:
            records[rec["rel"]] = rec
    return records


def _iter_results(tasks: list[ConvertTask], workers: int) -> Iterator[ConvertResult]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield convert_one(task)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(convert_one, tasks, chunksize=chunksize)


# ----------------------------------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare`: the report (also written to disk) and the exit status for the CLI."""

    report: dict[str, Any]
    exit_code: int


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Prepare a dataset: discover, convert in parallel, split, write manifests, preset, report and state.

    Safe to interrupt and re-run: outputs are written atomically, the state journal records each finished file,
    and a re-run only converts files whose bytes (or the conversion parameters) changed.

    Args:
        cfg: What to prepare and where (see :class:`PrepareConfig`).

    Returns:
        The report and the exit status (0; 1 if nothing usable remains, or if ``strict`` and a file was rejected).

    Raises:
        DatasetError: Invalid arguments, or the output folder is in use by another run.
    """
    from tqdm import tqdm

    cfg = cfg.resolved()
    out_dir = Path(cfg.out_dir)  # type: ignore[arg-type]
    wav_dir = out_dir / WAV_SUBDIR
    wav_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"Another prepare_dataset run is using {out_dir}; wait for it to finish.") from None
        for folder in (out_dir, wav_dir):  # temp files of a run that crashed
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

        params = {"sample_rate": SAMPLE_RATE, "min_seconds": cfg.min_seconds, "max_seconds": cfg.max_seconds,
                  "silence_peak": SILENCE_PEAK, "clip": [CLIP_LEVEL, CLIP_FLAG_FRACTION, CLIP_REJECT_FRACTION],
                  "version": STATE_VERSION}
        params["fingerprint"] = _hash_text(json.dumps(params, sort_keys=True))
        sources, issues, facts = discover(cfg)
        state_path = out_dir / STATE_FILE
        state = load_state(state_path)
        tasks = []
        for src in sources:
            prev = state.get(src.rel)
            if prev is not None and (prev.get("params") != params["fingerprint"] or prev.get("base") != src.base or
                                     any(not (wav_dir / o["name"]).is_file() for o in prev.get("outputs", []))):
                prev = None
            tasks.append(ConvertTask(src, str(wav_dir), params, prev))

        records: dict[str, dict[str, Any]] = {}
        converted = 0
        with open(state_path, "ab") as journal:
            bar = tqdm(total=len(tasks), unit="file", desc=f"prepare {cfg.name}",
                       disable=None if cfg.progress else True)  # None: only on a terminal
            for res in _iter_results(tasks, cfg.workers):
                bar.update(1)
                issues.extend(res.issues)
                converted += res.converted
                if res.record is None:
                    continue
                records[res.rel] = res.record
                if res.converted:
                    journal.write((json.dumps(res.record) + "\n").encode("utf-8"))
                    journal.flush()
            bar.close()

        kept = {rel: r for rel, r in records.items() if r["status"] == "kept"}
        # Outputs of files that were deleted, renamed or re-cut: remove them so no manifest can point at them.
        live = {o["name"] for r in kept.values() for o in r["outputs"]}
        live |= {Path(n).stem + ".json" for n in live}
        stale = [p for p in wav_dir.iterdir() if p.is_file() and p.name not in live and not p.name.startswith(".")]
        for p in stale:
            p.unlink()
        atomic.fsync_dir(wav_dir)

        splits = assign_splits(kept, cfg.valid_fraction)
        entries: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
        real_wav_dir = wav_dir.resolve()
        for rel, rec in kept.items():
            for o in rec["outputs"]:
                entries[splits[rel]].append({"path": str(real_wav_dir / o["name"]), "duration": o["duration"],
                                             "sample_rate": SAMPLE_RATE, "amplitude": None, "weight": None,
                                             "info_path": None})
        egs_dir = Path(cfg.egs_root) / cfg.name  # type: ignore[arg-type]
        manifests = {}
        for split, rows in entries.items():
            (egs_dir / split).mkdir(parents=True, exist_ok=True)
            target = egs_dir / split / "data.jsonl.gz"
            atomic.write_bytes(target, manifest_bytes(rows))
            manifests[split] = str(target)

        notes = []
        root = str(data_root())
        real_egs = os.path.realpath(egs_dir)
        ref = (Path(os.path.relpath(real_egs, root)).as_posix() if _is_within(real_egs, root) else real_egs)
        preset_path = Path(cfg.config_root) / f"{cfg.name}.yaml"  # type: ignore[arg-type]
        durations = [o["duration"] for r in kept.values() for o in r["outputs"]]
        captions = manifest_captions(egs_dir / "valid", 4) if entries["valid"] else []
        captions += [c for c in manifest_captions(egs_dir / "train", 4) if c not in captions]
        settings = preset_settings(durations, captions)
        body = preset_text(cfg.name, Path(cfg.dataset_dir), ref, settings)  # type: ignore[arg-type]
        action, note = write_preset(preset_path, body, cfg.force)
        if note:
            notes.append(note)

        # Compact the journal to the current sources.
        state_lines = b"".join((json.dumps(records[r]) + "\n").encode("utf-8") for r in sorted(records))
        atomic.write_bytes(state_path, state_lines)

        order = {REJECTED: 0, FLAGGED: 1, INFO: 2}
        issues.sort(key=lambda i: (order.get(i.status, 3), i.path, i.code))
        rejected_all = {i.path for i in issues if i.status == REJECTED}
        # Audio files only, so that kept + rejected == found; rejected captions rows and folders are counted apart.
        rejected = {p for p in rejected_all if Path(p).suffix.lower() in AUDIO_EXTS | UNSUPPORTED_EXTS}
        flagged = {i.path for i in issues if i.status == FLAGGED} & set(kept)
        split_hours = {s: sum(e["duration"] for e in rows) / 3600 for s, rows in entries.items()}
        if len(kept) == 1:
            notes.append("Only one usable file: the valid split is empty. Add more files.")
        report = {
            "name": cfg.name,
            "dataset_dir": str(cfg.dataset_dir),
            "out_dir": str(out_dir),
            **facts,
            "params": {k: v for k, v in params.items() if k != "fingerprint"},
            "totals": {
                "audio_files": len(kept) + len(rejected),
                "kept_files": len(kept),
                "rejected_files": len(rejected),
                "other_rejections": len(rejected_all - rejected),
                "flagged_files": len(flagged),
                "converted": converted,
                "unchanged": len(records) - converted,
                "stale_removed": len(stale),
                "clips": len(durations),
                "hours": sum(durations) / 3600,
                "train_clips": len(entries["train"]),
                "valid_clips": len(entries["valid"]),
                "train_hours": split_hours["train"],
                "valid_hours": split_hours["valid"],
            },
            "histogram": _histogram(durations),
            "splits": {rel: splits[rel] for rel in sorted(splits)},
            "manifests": manifests,
            "preset": {"path": str(preset_path), "action": action, **asdict(settings)},
            "notes": notes,
            "issues": [asdict(i) for i in issues],
        }
        atomic.write_bytes(out_dir / "report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
        atomic.write_bytes(out_dir / "report.txt", format_report_text(report).encode("utf-8"))
        atomic.fsync_dir(out_dir)
        exit_code = 0
        if not kept:
            exit_code = 1
        elif cfg.strict and rejected_all:
            exit_code = 1
        return PrepareResult(report, exit_code)
    finally:
        os.close(lock_fd)
