"""Audio output without an ffmpeg binary: loudness normalisation with a peak limiter, and atomic file writes.

audiocraft's `audio_write` pipes every format, WAV included, through an `ffmpeg` executable. Here soundfile
(libsndfile) writes WAV, FLAC, OGG and MP3 in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from solvers import atomic

FORMATS = {
    'wav': ('WAV', 'PCM_16'),
    'flac': ('FLAC', 'PCM_16'),
    'ogg': ('OGG', 'VORBIS'),
    'mp3': ('MP3', 'MPEG_LAYER_III'),
}
SILENCE_LUFS = -70.0  # BS.1770 absolute gate: below it a clip has no measurable loudness
DC_CUTOFF_HZ = 20.0  # the bottom of human hearing: what lies below is offset and drift, not sound


def loudness(wav: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4) in LUFS of a [C, T] or [T] waveform; -inf for silence."""
    wav = wav.detach().float().cpu()
    if wav.dim() == 1:
        wav = wav[None]
    # The gating blocks are 400 ms long; pad very short clips with silence so they can be measured at all.
    min_len = int(0.4 * sample_rate) + 1
    if wav.shape[-1] < min_len:
        wav = torch.nn.functional.pad(wav, (0, min_len - wav.shape[-1]))
    value = float(AF.loudness(wav, sample_rate))
    return value if np.isfinite(value) else float('-inf')


def remove_dc(wav: torch.Tensor, sample_rate: int, cutoff_hz: float = DC_CUTOFF_HZ) -> torch.Tensor:
    """Remove a DC offset and sub-audible drift: subtract the mean, then a 2nd-order high-pass at ``cutoff_hz``.

    Codecs (a random or barely trained one especially) can output a constant offset. Loudness measurement
    (BS.1770's K-weighting) ignores DC, so normalising such a clip amplifies an offset nobody hears until it clips
    and eats the headroom; removing it first keeps the audible part at the target.
    """
    wav = wav.detach().float()
    wav = wav - wav.mean(dim=-1, keepdim=True)
    return AF.highpass_biquad(wav, sample_rate, cutoff_hz)


def normalize_loudness(
    wav: torch.Tensor, sample_rate: int, target_lufs: float = -14.0, peak_db: float = -1.0, iterations: int = 4
) -> torch.Tensor:
    """Remove DC, then scale a [C, T] waveform to ``target_lufs`` keeping every sample below ``peak_db`` dBFS.

    A plain gain reaches the target unless the clip is very peaky; then a soft limiter (tanh above the ceiling's
    knee) shaves the peaks and the gain is re-measured, a few times, so the result sits at the target without
    clipping. Silent clips are returned unchanged.

    Args:
        wav: waveform, float, [C, T].
        sample_rate: its sample rate.
        target_lufs: integrated loudness to reach.
        peak_db: sample-peak ceiling in dBFS.
        iterations: gain/limit rounds.
    """
    wav = remove_dc(wav, sample_rate)
    ceiling = 10 ** (peak_db / 20)
    for _ in range(iterations):
        current = loudness(wav, sample_rate)
        if current < SILENCE_LUFS:
            return wav
        wav = wav * 10 ** ((target_lufs - current) / 20)
        if wav.abs().max() <= ceiling:
            break
        wav = _soft_limit(wav, ceiling)
    return wav.clamp(-ceiling, ceiling)


def _soft_limit(wav: torch.Tensor, ceiling: float, knee: float = 0.5) -> torch.Tensor:
    """Leave samples below ``knee * ceiling`` untouched and compress the rest smoothly into the ceiling."""
    threshold = knee * ceiling
    span = ceiling - threshold
    magnitude = wav.abs()
    over = magnitude > threshold
    limited = threshold + span * torch.tanh((magnitude - threshold) / span)
    return torch.where(over, wav.sign() * limited, wav)


def write_audio(
    path: str | os.PathLike, wav: torch.Tensor, sample_rate: int, fmt: str | None = None, overwrite: bool = False
) -> Path:
    """Write a [C, T] or [T] float waveform atomically (temporary file, fsync, rename).

    Args:
        path: destination; its suffix picks the format unless ``fmt`` is given.
        wav: waveform in [-1, 1].
        sample_rate: sample rate.
        fmt: one of wav, flac, ogg, mp3.
        overwrite: refuse to replace an existing file unless True.
    Returns:
        The written path.
    """
    import soundfile

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip('.') or 'wav').lower()
    if fmt not in FORMATS:
        raise ValueError(f"Unsupported audio format '{fmt}' for {path}: use one of {', '.join(FORMATS)}.")
    data = wav.detach().float().cpu()
    if data.dim() == 1:
        data = data[None]
    if not torch.isfinite(data).all():
        raise ValueError(f'Refusing to write {path}: the waveform has NaN or Inf samples.')
    container, subtype = FORMATS[fmt]
    with atomic.open_atomic(path, 'wb', overwrite) as f:
        soundfile.write(f, data.clamp(-1, 1).numpy().T, sample_rate, format=container, subtype=subtype)
    return path


def slugify(text: str, max_len: int = 60) -> str:
    """A filesystem-safe, readable folder name for a prompt (unicode letters kept, punctuation dropped)."""
    import hashlib
    import unicodedata

    norm = unicodedata.normalize('NFKC', text).strip().lower()
    chars = [c if (c.isalnum() or c in '-_') else '_' for c in norm]
    slug = '_'.join(part for part in ''.join(chars).split('_') if part)
    if not slug or len(slug.encode()) > max_len:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        slug = (slug.encode()[: max_len - 9].decode(errors='ignore').rstrip('_') + '_' + digest).lstrip('_')
    return slug
