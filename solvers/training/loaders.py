"""The solver's data loaders: micro-batches for gradient accumulation, and evaluation splits that read every clip.

audiocraft builds the loaders (``builders.get_audio_datasets``); these wrap or adjust them.
"""

from __future__ import annotations

import functools
import typing as tp

import flashy
import omegaconf
import torch

from solvers import data as dataprep
from solvers.training.signals import worker_ignores_ctrl_c

EVALUATION_SPLITS = ('valid', 'evaluate', 'generate')


class MicroBatches:
    """Groups a loader's batches by ``n``: one item per optimizer step, holding its ``n`` micro-batches."""

    def __init__(self, loader: torch.utils.data.DataLoader, n: int):
        self.loader, self.n = loader, n
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader) // self.n

    def __iter__(self) -> tp.Iterator[list]:
        group: list = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.n:
                yield group
                group = []


def set_sample_counts(cfg: omegaconf.DictConfig) -> list[str]:
    """Fill the ``num_samples`` audiocraft needs before it builds the loaders; return the splits read whole.

    The train split samples exactly the segments an epoch consumes (random files and offsets), whatever the dataset
    size. Other splits with ``num_samples: null`` read one segment of every clip of their manifest: audiocraft's
    AudioDataset needs a number (``len(loader)`` fails on None) and otherwise draws files at random, with replacement.

    Args:
        cfg: the whole solver config (``dataset``, ``datasource``, ``optim``), updated in place.
    """
    train = cfg.dataset.train
    if train.num_samples is None and cfg.optim.updates_per_epoch:
        per_update = flashy.distrib.world_size() * cfg.dataset.batch_size * cfg.optim.grad_accum_steps
        train.num_samples = per_update * cfg.optim.updates_per_epoch
    covered = []
    for split in EVALUATION_SPLITS:
        path = cfg.datasource.get(split)
        if isinstance(path, str) and cfg.dataset[split].num_samples is None:
            cfg.dataset[split].num_samples = len(dataprep.read_manifest(path))
            covered.append(split)
    return covered


def adjust(loaders: dict, covered: tp.Sequence[str], grad_accum_steps: int) -> None:
    """After audiocraft built ``loaders``: workers that survive a Ctrl-C, whole evaluation splits, micro-batches."""
    from audiocraft.utils.utils import get_dataset_from_loader

    for loader in loaders.values():
        loader.worker_init_fn = functools.partial(worker_ignores_ctrl_c, chained=loader.worker_init_fn)
    for split in covered:
        if split in loaders:
            read_every_clip_once(get_dataset_from_loader(loaders[split]))
    if 'train' in loaders:
        loaders['train'] = MicroBatches(loaders['train'], grad_accum_steps)


class _ClipByIndex:
    """``AudioDataset.sample_file`` replacement: segment ``i`` comes from clip ``i % len(meta)``.

    A module-level class (not a closure) so the dataset still pickles into forkserver/spawn loader workers.
    """

    def __init__(self, meta: list):
        self.meta = meta

    def __call__(self, index: int, rng: torch.Generator) -> tp.Any:
        return self.meta[index % len(self.meta)]


def read_every_clip_once(dataset: tp.Any) -> None:
    """Make segment ``i`` of an evaluation split come from clip ``i`` (a random offset inside it, seeded by ``i``).

    audiocraft's AudioDataset.sample_file draws a random file for every segment, so a valid pass of N segments skips
    some clips and reads others twice; a fixed assignment measures every clip, the same way at every epoch.
    """
    dataset.sample_file = _ClipByIndex(dataset.meta)
