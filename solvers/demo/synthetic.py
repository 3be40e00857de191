"""Deterministic synthesiser of a small captioned sound dataset (numpy only) for demos and tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MIN_SECONDS = 1.0
MAX_SECONDS = 4.0

Synth = Callable[[np.random.Generator, int], np.ndarray]


def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / SAMPLE_RATE


def _envelope(n: int, attack: float, decay: float) -> np.ndarray:
    """Attack/exponential-decay envelope over ``n`` samples (times in seconds)."""
    t = _t(n)
    env = np.exp(-t / max(decay, 1e-3))
    a = max(1, int(attack * SAMPLE_RATE))
    env[:a] *= np.linspace(0.0, 1.0, a)
    return env


def _lowpass(x: np.ndarray, alpha: float) -> np.ndarray:
    """First-order low-pass magnitude response applied in the frequency domain (smaller ``alpha`` is darker)."""
    # A one-pole filter is recursive (a Python loop without scipy); the clips are short (<= 4 s), so shaping the
    # spectrum with the same magnitude response is fast and good enough for a demo.
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / SAMPLE_RATE)
    cutoff = alpha * SAMPLE_RATE / (2 * np.pi)
    spec /= np.sqrt(1.0 + (freqs / max(cutoff, 1.0)) ** 2)
    return np.fft.irfft(spec, n=len(x))


def _bandpass_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[(freqs < low) | (freqs > high)] = 0.0
    out = np.fft.irfft(spec, n=n)
    return out / (np.abs(out).max() + 1e-9)


def dog_bark(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two to four short harmonic barks with a falling pitch and a noisy edge."""
    out = np.zeros(n)
    n_barks = int(rng.integers(2, 5))
    starts = np.sort(rng.uniform(0.0, max(n / SAMPLE_RATE - 0.3, 0.05), n_barks))
    for start in starts:
        length = int(rng.uniform(0.12, 0.25) * SAMPLE_RATE)
        s = int(start * SAMPLE_RATE)
        length = min(length, n - s)
        if length <= 0:
            continue
        t = _t(length)
        f0 = rng.uniform(350, 600) * np.exp(-t * rng.uniform(3, 6))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        bark = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.3 * rng.standard_normal(length)
        out[s : s + length] += bark * _envelope(length, 0.01, 0.08)
    return out


def siren(rng: np.random.Generator, n: int) -> np.ndarray:
    """A wailing siren: a tone swept up and down by a slow LFO."""
    t = _t(n)
    rate = rng.uniform(0.4, 1.0)
    freq = rng.uniform(650, 800) + rng.uniform(250, 400) * np.sin(2 * np.pi * rate * t)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return np.sin(phase) + 0.25 * np.sin(3 * phase)


def rain(rng: np.random.Generator, n: int) -> np.ndarray:
    """Broadband hiss plus many random droplet clicks."""
    hiss = _bandpass_noise(rng, n, 400, 7000) * 0.4
    drops = np.zeros(n)
    idx = rng.integers(0, n, size=int(n / SAMPLE_RATE * rng.uniform(80, 200)))
    drops[idx] = rng.uniform(-1, 1, size=idx.size)
    drops = _lowpass(drops, 0.6) * 3.0
    return hiss + drops


def bell(rng: np.random.Generator, n: int) -> np.ndarray:
    """Inharmonic bell partials with long exponential decays, struck once or twice."""
    t = _t(n)
    f0 = rng.uniform(300, 900)
    ratios = (0.5, 1.0, 1.19, 1.56, 2.0, 2.74, 3.0)
    tone = np.zeros(n)
    for i, r in enumerate(ratios):
        tone += np.sin(2 * np.pi * f0 * r * t) * np.exp(-t * (0.8 + 0.6 * i)) / (1 + 0.4 * i)
    out = tone * _envelope(n, 0.002, 10.0)
    if n > SAMPLE_RATE * 1.5 and rng.random() < 0.5:
        s = int(rng.uniform(0.8, n / SAMPLE_RATE - 0.5) * SAMPLE_RATE)
        out[s:] += 0.8 * tone[: n - s]
    return out


def engine(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low sawtooth-like hum with amplitude modulation at the firing rate."""
    t = _t(n)
    f0 = rng.uniform(35, 70)
    saw = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
    am = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(6, 14) * t)
    rumble = _lowpass(rng.standard_normal(n), 0.05) * 2.0
    return saw * am + rumble


def footsteps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Regular dull thuds of filtered noise, like steps on a wooden floor."""
    out = np.zeros(n)
    period = rng.uniform(0.4, 0.65)
    start = rng.uniform(0.0, 0.2)
    while start < n / SAMPLE_RATE - 0.05:
        s = int(start * SAMPLE_RATE)
        length = min(int(0.09 * SAMPLE_RATE), n - s)
        thud = _bandpass_noise(rng, length, 80, 1500) * _envelope(length, 0.002, 0.02)
        out[s : s + length] += thud * rng.uniform(0.7, 1.0)
        start += period * rng.uniform(0.92, 1.08)
    return out


def whistle(rng: np.random.Generator, n: int) -> np.ndarray:
    """A whistled melody: a pure tone with vibrato stepping between a few notes."""
    t = _t(n)
    n_notes = int(rng.integers(2, 6))
    notes = rng.uniform(1200, 2400, size=n_notes)
    freq = notes[np.minimum((t / (t[-1] + 1e-9) * n_notes).astype(int), n_notes - 1)]
    freq = _lowpass(freq - freq.mean(), 0.3) + freq.mean()  # glide between notes like a real whistle
    freq *= 1.0 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return np.sin(phase) + 0.03 * rng.standard_normal(n)


@dataclass(frozen=True)
class SoundClass:
    """One synthetic sound class: a name, a synthesiser and caption variants."""

    name: str
    synth: Synth
    captions: tuple[str, ...]


CLASSES: tuple[SoundClass, ...] = (
    SoundClass('dog_bark', dog_bark, ('a dog barking', 'a dog barks several times', 'a small dog barking nearby')),
    SoundClass(
        'siren', siren, ('an emergency siren wailing', 'a police siren passing by', 'a siren sweeping up and down')
    ),
    SoundClass('rain', rain, ('rain falling steadily', 'heavy rain on a roof', 'raindrops pattering outside')),
    SoundClass('bell', bell, ('a bell ringing', 'a church bell chiming', 'a small metal bell is struck')),
    SoundClass('engine', engine, ('an engine idling', 'a car engine humming', 'a diesel motor running')),
    SoundClass('footsteps', footsteps, ('footsteps on a wooden floor', 'a person walking', 'slow footsteps')),
    SoundClass('whistle', whistle, ('a person whistling a tune', 'someone whistles a melody', 'a high whistle')),
)


# The demo's story: the stand-in package is "pretrained" on the known classes; `make demo` fine-tunes it on the new
# ones, as a user fine-tunes on sounds the model doesn't know. No caption of a new class shares a LUT bucket with a
# known one (tests/test_demo.py checks it), so the new captions start from untrained embeddings.
KNOWN_CLASSES = ('dog_bark', 'siren', 'rain', 'bell')
NEW_CLASSES = ('engine', 'footsteps', 'whistle')
CLASS_NAMES = tuple(c.name for c in CLASSES)


def select_classes(spec: str) -> tuple[SoundClass, ...]:
    """The classes named by ``spec``: ``all``, ``known``, ``new``, or comma-separated class names.

    Raises:
        ValueError: an unknown name, with the valid ones.
    """
    groups = {'all': CLASS_NAMES, 'known': KNOWN_CLASSES, 'new': NEW_CLASSES}
    names = groups.get(spec) or tuple(n.strip() for n in spec.split(',') if n.strip())
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown or not names:
        raise ValueError(
            f'Unknown sound class {", ".join(unknown) or repr(spec)}: use all, known, new or names '
            f'among {", ".join(CLASS_NAMES)}.'
        )
    return tuple(c for c in CLASSES if c.name in names)


def window(x: np.ndarray, seconds: float) -> np.ndarray:
    """The first ``seconds`` of a clip, zero-padded when shorter (how a training segment starts)."""
    n = int(round(seconds * SAMPLE_RATE))
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(x))] = x[:n]
    return out


def synthesize_clip(cls: SoundClass, seed: int, index: int) -> tuple[np.ndarray, str]:
    """Synthesise one clip of a class.

    Args:
        cls: The sound class.
        seed: Global seed; the same (seed, class, index) always gives the same samples.
        index: Clip index inside the class.

    Returns:
        Mono float32 samples at 16 kHz (peak between 0.3 and 0.9) and the caption.
    """
    class_id = [c.name for c in CLASSES].index(cls.name)
    rng = np.random.default_rng([seed, class_id, index])
    n = int(rng.uniform(MIN_SECONDS, MAX_SECONDS) * SAMPLE_RATE)
    x = cls.synth(rng, n)
    fade = min(int(0.01 * SAMPLE_RATE), n // 2)  # 10 ms fades so clips don't start or end with a click
    x[:fade] *= np.linspace(0.0, 1.0, fade)
    x[n - fade :] *= np.linspace(1.0, 0.0, fade)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.9)
    # Captions take turns (shifted per class), so any 3 clips of a class carry all of its captions.
    caption = cls.captions[(index + class_id) % len(cls.captions)]
    return x.astype(np.float32), caption


def make_demo_dataset(
    out_dir: str | Path, seed: int = 0, per_class: int = 8, classes: tuple[SoundClass, ...] = CLASSES
) -> list[Path]:
    """Write the demo dataset in the ``audio/`` + ``metadata/`` layout.

    Args:
        out_dir: Destination folder; ``audio/<class>_<i>.wav`` (16 kHz mono PCM16) and
            ``metadata/<class>_<i>.json`` (``{"text", "duration", "sample_rate"}``) are written inside.
        seed: Seed of the whole dataset.
        per_class: Number of clips per sound class.
        classes: The sound classes to write (all of them by default; see :func:`select_classes`).

    Returns:
        The paths of the written WAV files.
    """
    if per_class < 1:
        raise ValueError(f'per_class must be at least 1, got {per_class}.')
    out_dir = Path(out_dir)
    (out_dir / 'audio').mkdir(parents=True, exist_ok=True)
    (out_dir / 'metadata').mkdir(parents=True, exist_ok=True)
    written = []
    for cls in classes:
        for i in range(per_class):
            x, caption = synthesize_clip(cls, seed, i)
            stem = f'{cls.name}_{i:03d}'
            wav_path = out_dir / 'audio' / f'{stem}.wav'
            tmp = wav_path.with_name(f'.{wav_path.name}.tmp')
            sf.write(tmp, x, SAMPLE_RATE, subtype='PCM_16', format='WAV')
            os.replace(tmp, wav_path)
            meta = {'text': caption, 'duration': round(len(x) / SAMPLE_RATE, 4), 'sample_rate': SAMPLE_RATE}
            (out_dir / 'metadata' / f'{stem}.json').write_text(json.dumps(meta) + '\n', encoding='utf-8')
            written.append(wav_path)
    return written
