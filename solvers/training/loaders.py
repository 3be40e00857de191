"""The solver's data loaders: micro-batches for gradient accumulation, and evaluation splits that read every clip.

audiocraft builds the loaders (``builders.get_audio_datasets``); these wrap or adjust them.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import typing as tp

import flashy
import omegaconf
import torch
from audiocraft.data.audio_dataset import SegmentInfo
from audiocraft.data.sound_dataset import SoundDataset, SoundInfo
from audiocraft.modules.conditioners import WavCondition

from solvers import data as dataprep
from solvers.training import token_cache
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


class TokenSegments(SoundDataset):
    """audiocraft's SoundDataset read in token space: segment ``i`` is the same clip and (frame-aligned) offset as
    the audio dataset's, its tokens come from the token cache (:mod:`solvers.training.token_cache`).

    The segment rules are AudioDataset.__getitem__'s (audiocraft/data/audio_dataset.py), in the same order: a
    generator seeded by the index, the epoch and ``shuffle_seed``; the clip from ``sample_file``; the offset
    ``rand * max(0, duration - segment * min_segment_ratio)``, here floored to a codec frame; short clips padded.
    The caption is read as SoundDataset.__getitem__ reads it. Items are ``(int16 tokens (n_q, frames), SoundInfo)``
    with ``n_frames`` in samples, as the audio path reports them, so the solver's padding mask is the same.
    """

    cache: token_cache.TokenCache

    @classmethod
    def from_audio_dataset(cls, audio: SoundDataset, cache: token_cache.TokenCache) -> TokenSegments:
        """The token twin of ``audio`` (its clips, sampling settings and epoch), reading ``cache``."""
        if audio.segment_duration is None or not audio.pad:
            raise token_cache.TokenCacheError(
                'The token cache reads fixed-length padded segments: set dataset.segment_duration, or '
                'token_cache=false.'
            )
        dataset = cls.__new__(cls)
        dataset.__dict__.update(audio.__dict__)
        dataset.cache = cache
        return dataset

    def __getitem__(self, index: int) -> tuple[torch.Tensor, SoundInfo]:
        assert self.segment_duration is not None  # from_audio_dataset refuses whole-clip datasets
        rng = torch.Generator()
        if self.shuffle:
            epoch = random.randint(0, 2**24) if self.current_epoch is None else self.current_epoch + self.shuffle_seed
            rng.manual_seed(index + self.num_samples * epoch)
        else:
            rng.manual_seed(index)
        meta = self.sample_file(index, rng)
        max_seek = max(0, meta.duration - self.segment_duration * self.min_segment_ratio)
        seek_time = torch.rand(1, generator=rng).item() * max_seek
        rate, frame_rate = self.cache.sample_rate, self.cache.frame_rate
        first = int(seek_time * frame_rate)
        target = int(self.segment_duration * rate)
        tokens = self.cache.window(meta.path, first, token_cache.segment_frames(target, rate, frame_rate))
        hop_start = round(first * rate / frame_rate)
        n_frames = max(0, min(self.cache.samples(meta.path) - hop_start, target))
        info = SegmentInfo(
            meta, first / frame_rate, n_frames=n_frames, total_frames=target, sample_rate=rate, channels=1
        )
        return tokens, self._sound_info(info)

    def _sound_info(self, info: SegmentInfo) -> SoundInfo:
        """The caption and segment info, as SoundDataset.__getitem__ builds them; ``self_wav`` holds one silent
        sample, not the audio (AudioGen conditions on text only, but audiocraft's condition dropout visits it)."""
        info_data = info.to_dict()
        info_path = self._get_info_path(info.meta.path)
        with open(info_path, encoding='utf-8') as json_file:
            sound_data = json.load(json_file)
        sound_data.update(info_data)
        sound_info = SoundInfo.from_dict(sound_data, fields_required=self.info_fields_required)
        if isinstance(sound_info.description, list):
            sound_info.description = random.choice(sound_info.description)
        sound_info.self_wav = WavCondition(
            wav=torch.zeros(1, info.channels, 1),
            length=torch.tensor([info.n_frames]),
            sample_rate=[info.sample_rate],
            path=[info.meta.path],
            seek_time=[info.seek_time],
        )
        return sound_info

    def collater(self, samples: list) -> tuple[torch.Tensor, list[SoundInfo]]:
        """Stack the tokens ``(B, n_q, frames)``; audio mixing has no token-space form (settings refuse ``aug_p``)."""
        return torch.stack([tokens for tokens, _ in samples]), [copy.deepcopy(info) for _, info in samples]


TOKEN_SPLITS = ('train', 'valid')  # the splits whose batches go through the solver's run_step


def use_token_cache(loaders: dict, cache: token_cache.TokenCache) -> None:
    """Replace the train and valid loaders by loaders over :class:`TokenSegments` with the same sampler, subset,
    batch size and workers.

    Keeping the sampler keeps the order of items (a ``DistributedSampler`` keeps each rank's share, and audiocraft's
    per-rank ``Subset`` of evaluation splits keeps its indices), so ranks read disjoint items as before.
    """
    for split in TOKEN_SPLITS:
        if split not in loaders:
            continue
        loader = loaders[split]
        audio = loader.dataset.dataset if isinstance(loader.dataset, torch.utils.data.Subset) else loader.dataset
        tokens = TokenSegments.from_audio_dataset(tp.cast(SoundDataset, audio), cache)
        dataset: tp.Any = tokens
        if isinstance(loader.dataset, torch.utils.data.Subset):
            dataset = torch.utils.data.Subset(tp.cast(tp.Any, tokens), loader.dataset.indices)
        loaders[split] = torch.utils.data.DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=loader.sampler,
            num_workers=loader.num_workers,
            collate_fn=tokens.collater,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
        )
