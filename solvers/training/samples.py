"""Epoch samples: the sample prompts, generated through the one generation path and written as -14 LUFS WAVs.

Each prompt is generated with seed :data:`SEED` by :func:`solvers.generation.generate.generate_clips`, so the sample
of an epoch whose weights became the best state is the file ``python -m scripts.generate "<prompt>" --model <sig>
--seeds 0 --duration <generate.duration>`` writes with the same sampling settings (up to the float rounding of
differently sized batches that solvers/generation/generate.py describes; bit for bit on the CPU).
"""

from __future__ import annotations

import logging
import math
import time
import typing as tp
from pathlib import Path

import omegaconf

from solvers import data as dataprep
from solvers.generation import audio_io
from solvers.generation import generate as generation

logger = logging.getLogger(__name__)

SEED = 0  # every sample prompt's seed: scripts/generate.py's --seeds 0 regenerates it


def sample_prompts(cfg: omegaconf.DictConfig) -> list[str]:
    """`generate.prompts` (``[]``: no samples), or when it is null the first `generate.prompts_from_dataset`
    distinct captions of the valid split (then train): samples that speak of the user's own sounds."""
    if cfg.generate.prompts is not None:
        return [str(p) for p in cfg.generate.prompts]
    prompts = dataprep.sample_prompts(cfg)
    logger.info("Sample prompts from the dataset's captions: %s", prompts)
    return prompts


def generate_samples(
    cfg: omegaconf.DictConfig, lm: tp.Any, compression_model: tp.Any, autocast: tp.Any, prompts: list[str], name: str
) -> tuple[list, float]:
    """The clips of ``prompts`` with ``lm``'s current weights ([C, T] float32 CPU tensors, in order) and the
    real-time factor (generation seconds per second of audio).

    Args:
        cfg: the whole solver config (``generate``, ``dataset.segment_duration``, ``classifier_free_guidance``).
        lm: the solver's LM (its train/eval mode is restored after).
        compression_model: the solver's codec.
        autocast: the solver's autocast context.
        prompts: the sample prompts.
        name: the model's name (recorded by audiocraft).
    """
    begin, duration = time.time(), float(cfg.generate.duration)
    training = lm.training
    try:
        model = generation.training_audiogen(
            name,
            compression_model,
            lm,
            decoder=str(cfg.generate.get('decoder') or 'fast'),
            segment_duration=float(cfg.dataset.segment_duration),
            duration=duration,
            autocast=autocast,
        )
        generation.GenerationParams.from_config(cfg, duration).apply(model)
        clips = generation.generate_clips(model, prompts, [SEED], max_batch=len(prompts))
    finally:
        lm.train(training)
    return [clips[(p, SEED)] for p in prompts], (time.time() - begin) / (duration * len(prompts))


def write_samples(
    generate: omegaconf.DictConfig,
    folder: Path,
    epoch: int,
    prompts: list[str],
    clips: list,
    sample_rate: int,
    tensorboard: tp.Any = None,
) -> dict[str, float]:
    """Write ``<folder>/<generate.path>/epoch_NNN/NN_<slug>.wav`` at ``generate.loudness`` (and log them to
    TensorBoard); return the mean loudness (``lufs``) when any clip is not silent.

    Args:
        generate: the ``generate`` block.
        folder: the XP folder.
        epoch: the epoch the samples belong to.
        prompts: the prompts, in order.
        clips: their clips.
        sample_rate: the codec's sample rate.
        tensorboard: a logger with ``log_audio`` (:class:`solvers.training.curves.CurvesLogger`), or None.
    """
    out = folder / generate.path / f'epoch_{epoch:03d}'
    lufs = []
    for i, (prompt, wav) in enumerate(zip(prompts, clips)):
        wav = audio_io.normalize_loudness(wav, sample_rate, generate.loudness)
        stem = f'{i:02d}_{audio_io.slugify(prompt, 40)}'
        path = audio_io.write_audio(out / f'{stem}.wav', wav, sample_rate, overwrite=True)
        lufs.append(audio_io.loudness(wav, sample_rate))
        if tensorboard is not None:
            tensorboard.log_audio(stem, 'samples', wav, sample_rate, epoch)
        logger.info("Sample '%s' -> %s", prompt, path)
    finite = [x for x in lufs if math.isfinite(x)]
    return {'lufs': sum(finite) / len(finite)} if finite else {}
