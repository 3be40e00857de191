"""The token cache (solvers/training/token_cache.py) and its loader (solvers/training/loaders.TokenSegments): the
same tokens as the audio path for clips no longer than the segment, rebuilds of what changed only, a build that
resumes after an interruption, disjoint items per DDP rank, and a `dora run` that trains on it and resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import typing as tp
from pathlib import Path

import pytest
import torch
from helpers import run_dora, start_dora

from solvers.training import loaders, token_cache

SEGMENT = 4.0  # seconds: longer than every clip of the tiny dataset (1.1-4.0 s), so every clip is padded


@pytest.fixture(scope='module')
def codec(tiny_package):
    from solvers.models import package

    return package.load_compression_model(str(tiny_package))


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A data root of its own, so each test's cache starts empty."""
    monkeypatch.setenv('AUDIOGEN_HOME', str(tmp_path / 'home'))
    return tmp_path / 'home'


class CountingCodec(torch.nn.Module):
    """The codec, counting the clips it encodes; raises ``stop_after`` encodes in (a Ctrl-C in the middle)."""

    def __init__(self, codec: tp.Any, stop_after: int | None = None):
        super().__init__()
        self.codec, self.calls, self.stop_after = codec, 0, stop_after
        self.sample_rate, self.channels = codec.sample_rate, codec.channels
        self.frame_rate, self.num_codebooks = codec.frame_rate, codec.num_codebooks

    def encode(self, wav: torch.Tensor) -> tp.Any:
        if wav.abs().sum() > 0:  # not the silence probe
            self.calls += 1
            if self.stop_after is not None and self.calls > self.stop_after:
                raise KeyboardInterrupt
        return self.codec.encode(wav)


def audio_dataset(manifest: Path, segment: float, shuffle: bool, num_samples: int, ratio: float = 1.0) -> tp.Any:
    """audiocraft's SoundDataset as the solver's loaders build it (padding, info, the given segment rules)."""
    from audiocraft.data.sound_dataset import SoundDataset

    return SoundDataset.from_meta(
        str(manifest),
        segment_duration=segment,
        num_samples=num_samples,
        sample_rate=16000,
        channels=1,
        pad=True,
        shuffle=shuffle,
        sample_on_duration=False,
        sample_on_weight=False,
        min_segment_ratio=ratio,
    )


def build_cache(codec: tp.Any, manifests: tp.Sequence[Path], segment: float, **kwargs: tp.Any) -> tp.Any:
    clips = []
    for manifest in manifests:
        for entry in loaders.dataprep.read_manifest(manifest):
            clips.append(token_cache.clip_for(entry['path'], entry['duration'], 16000, int(segment * 16000)))
    folder = token_cache.cache_dir('tiny', token_cache.codec_checksum(codec))
    return token_cache.build(codec, clips, folder, progress=False, **kwargs)


def test_cached_tokens_equal_encoded_audio_for_clips_within_the_segment(home, codec, tiny_dataset):
    """Every clip at offset 0, padded to the segment: the cache's tokens are the codec's tokens of the audio item."""
    report = build_cache(codec, [tiny_dataset['train']], SEGMENT)
    cache = token_cache.TokenCache(report.folder)
    audio = audio_dataset(tiny_dataset['train'], SEGMENT, shuffle=False, num_samples=len(cache))
    loaders.read_every_clip_once(audio)
    tokens = loaders.TokenSegments.from_audio_dataset(audio, cache)
    for i in range(len(audio)):
        wav, info = audio[i]
        codes, cached_info = tokens[i]
        assert info.seek_time == cached_info.seek_time == 0
        assert (info.n_frames, info.total_frames) == (cached_info.n_frames, cached_info.total_frames)
        assert info.description == cached_info.description
        with torch.no_grad():
            expected = codec.encode(wav[None])[0][0]
        assert codes.dtype == torch.int16 and torch.equal(codes.long(), expected)


def test_longer_clips_differ_only_near_the_segment_edges(home, codec, tiny_dataset):
    """A 1 s segment of a longer clip at a random offset: the cache's tokens (the clip encoded whole) against the
    segment encoded alone agree on most frames, not all (the codec's context reaches past the segment's edges)."""
    segment = 1.0
    report = build_cache(codec, [tiny_dataset['train']], segment)
    cache = token_cache.TokenCache(report.folder)
    audio = audio_dataset(tiny_dataset['train'], segment, shuffle=False, num_samples=len(cache), ratio=1.0)
    loaders.read_every_clip_once(audio)
    tokens = loaders.TokenSegments.from_audio_dataset(audio, cache)
    same = total = 0
    for i in range(len(audio)):
        codes, info = tokens[i]
        first = round(info.seek_time * cache.sample_rate)  # a frame boundary, in samples
        wav = _read(info.meta.path, first, int(segment * 16000))
        with torch.no_grad():
            alone = codec.encode(wav[None])[0][0]
        same += int((codes.long() == alone).all(0).sum())
        total += alone.shape[-1]
    assert 0 < same < total  # some frames differ (the context), most agree


def _read(path: str, first: int, samples: int) -> torch.Tensor:
    """``samples`` samples of a clip from sample ``first``, zero-padded: the audio path's segment at that offset."""
    from audiocraft.data.audio import audio_read

    wav = audio_read(path)[0][:, first : first + samples]
    return torch.nn.functional.pad(wav, (0, samples - wav.shape[-1]))


def test_an_added_clip_or_another_codec_rebuilds_only_what_changed(home, codec, tiny_dataset, tiny_package):
    counting = CountingCodec(codec)
    first = build_cache(counting, [tiny_dataset['train']], SEGMENT)
    clips = len(loaders.dataprep.read_manifest(tiny_dataset['train']))
    assert (first.encoded, first.kept, counting.calls) == (clips, 0, clips)
    again = build_cache(counting, [tiny_dataset['train']], SEGMENT)
    assert (again.encoded, again.kept, counting.calls) == (0, clips, clips)
    # An added clip (the valid split joins the cache): only its clips are encoded; the first shard stays as it was.
    added = len(loaders.dataprep.read_manifest(tiny_dataset['valid']))
    shard = sorted(first.folder.glob('shard-*.npy'))[0]
    stamp = shard.stat().st_mtime_ns
    grown = build_cache(counting, [tiny_dataset['train'], tiny_dataset['valid']], SEGMENT)
    assert (grown.encoded, grown.kept, counting.calls) == (added, clips, clips + added)
    assert shard.stat().st_mtime_ns == stamp
    # A removed clip: its entry goes, nothing is encoded.
    shrunk = build_cache(counting, [tiny_dataset['train']], SEGMENT)
    assert (shrunk.encoded, shrunk.removed) == (0, added)
    # Another codec (one weight changed): another folder, every clip encoded for it; the first cache is untouched.
    other = CountingCodec(_perturbed(tiny_package))
    rebuilt = build_cache(other, [tiny_dataset['train']], SEGMENT)
    assert rebuilt.folder != first.folder and (rebuilt.encoded, other.calls) == (clips, clips)
    assert token_cache.TokenCache(first.folder).entries.keys() == token_cache.TokenCache(rebuilt.folder).entries.keys()


def _perturbed(package_dir: Path) -> tp.Any:
    """The package's codec again, one of its weights changed."""
    from solvers.models import package

    other = package.load_compression_model(str(package_dir))
    with torch.no_grad():
        next(iter(other.parameters())).add_(1e-3)
    return other


def test_a_re_prepared_clip_is_encoded_again(home, codec, tiny_dataset, tmp_path):
    """A clip whose file changed (prepare_dataset writes a new file): its key changes, it alone is encoded."""
    entries = loaders.dataprep.read_manifest(tiny_dataset['train'])[:3]
    for entry in entries:
        shutil.copy(entry['path'], tmp_path / Path(entry['path']).name)
    clips = [token_cache.clip_for(str(tmp_path / Path(e['path']).name), e['duration'], 16000, 64000) for e in entries]
    folder = tmp_path / 'cache'
    token_cache.build(codec, clips, folder, progress=False)
    Path(clips[1].path).write_bytes(Path(entries[0]['path']).read_bytes())  # new content, new mtime
    renewed = [token_cache.clip_for(c.path, e['duration'], 16000, 64000) for c, e in zip(clips, entries)]
    report = token_cache.build(codec, renewed, folder, progress=False)
    assert (report.encoded, report.kept, report.removed) == (1, 2, 1)


def test_an_interrupted_build_keeps_its_shards_and_resumes(home, codec, tiny_dataset):
    clips = len(loaders.dataprep.read_manifest(tiny_dataset['train']))
    frames = token_cache.segment_frames(int(SEGMENT * 16000), 16000, codec.frame_rate)
    stopped = CountingCodec(codec, stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        build_cache(stopped, [tiny_dataset['train']], SEGMENT, shard_frames=2 * frames)  # a shard every 2 clips
    folder = token_cache.cache_dir('tiny', token_cache.codec_checksum(stopped))  # the wrapper's weights: codec.*
    index = json.loads((folder / token_cache.INDEX_FILE).read_text())
    assert len(index['clips']) == 4 and len(index['shards']) == 2  # the 5th clip's shard was never written
    assert not list(folder.glob('.*.tmp'))
    resumed = CountingCodec(codec)
    report = build_cache(resumed, [tiny_dataset['train']], SEGMENT, shard_frames=2 * frames)
    assert (report.encoded, report.kept, resumed.calls) == (clips - 4, 4, clips - 4)
    assert build_cache(resumed, [tiny_dataset['train']], SEGMENT).encoded == 0


def test_ddp_ranks_read_disjoint_items(home, codec, tiny_dataset):
    """The token loaders keep the audio loaders' samplers: a DistributedSampler's share per rank (train) and
    flashy's per-rank Subset (valid)."""
    from audiocraft.utils.utils import get_dataset_from_loader

    report = build_cache(codec, [tiny_dataset['train']], SEGMENT)
    cache = token_cache.TokenCache(report.folder)
    seen: dict[str, list[set]] = {'train': [], 'valid': []}
    for rank in range(2):
        train = audio_dataset(tiny_dataset['train'], SEGMENT, shuffle=True, num_samples=16)
        valid = audio_dataset(tiny_dataset['train'], SEGMENT, shuffle=False, num_samples=len(cache))
        sampler = torch.utils.data.DistributedSampler(train, num_replicas=2, rank=rank, seed=0)
        audio_loaders = {
            'train': torch.utils.data.DataLoader(train, batch_size=2, sampler=sampler, collate_fn=train.collater),
            'valid': torch.utils.data.DataLoader(
                torch.utils.data.Subset(valid, list(range(rank, len(valid), 2))),
                batch_size=2,
                collate_fn=valid.collater,
            ),
        }
        loaders.use_token_cache(audio_loaders, cache)
        for split, loader in audio_loaders.items():
            assert isinstance(get_dataset_from_loader(loader), loaders.TokenSegments)
            indices = list(loader.sampler) if split == 'train' else list(loader.dataset.indices)
            seen[split].append(set(indices))
            batch = next(iter(loader))
            assert batch[0].dtype == torch.int16 and len(batch[1]) == batch[0].shape[0]
    for split, (first, second) in seen.items():
        assert first and second and not first & second, split


@pytest.mark.slow
def test_dora_run_trains_on_the_cache_and_resumes(tmp_path, monkeypatch, demo_overrides):
    """token_cache=true: the run builds the cache under the data root and trains; a Ctrl-C at its first step
    checkpoint stops it, and the same command resumes it to the end, reading the cache without encoding."""
    outputs = tmp_path / 'outputs'
    monkeypatch.setenv('AUDIOGEN_HOME', str(tmp_path / 'home'))  # the cache goes under this data root
    args = demo_overrides + [
        'token_cache=true',
        'optim.updates_per_epoch=6',
        'checkpoint.save_every_updates=2',
        'generate.every=100',
        'generate.prompts=[a dog barking]',
        'generate.duration=0.5',
    ]
    proc = start_dora(args, outputs)
    try:
        while proc.poll() is None and not list(outputs.glob('xps/*/checkpoint*.th')):
            time.sleep(0.02)
        assert proc.poll() is None, 'the run ended before its first checkpoint'
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 'clips encoded now' in stderr
    assert len(list((tmp_path / 'home' / 'data' / 'tiny' / 'tokens').glob('*/index.json'))) == 1
    proc2 = run_dora(args, outputs)
    log = proc2.stderr + proc2.stdout
    assert ' 0 clips encoded now' in log
    assert 'Resuming epoch' in log or 'Loading existing checkpoint' in log
    history = json.loads(next(outputs.glob('xps/*/history.json')).read_text())
    assert len(history) == 2 and all(row['train']['ce'] > 0 and row['valid']['ce'] > 0 for row in history)


def test_cache_tokens_cli_builds_then_finds_everything_cached(tmp_path, tiny_package, tiny_dataset):
    """`python -m scripts.cache_tokens <dora run overrides>`: the cache under the data root, then nothing to encode."""
    import subprocess
    import sys

    from helpers import ROOT, subprocess_env

    env = dict(subprocess_env(), AUDIOGEN_HOME=str(tmp_path / 'home'))
    overrides = ['solver=audiogen/tiny', f'pretrained={tiny_package}', f'datasource.train={tiny_dataset["train"]}']
    overrides += [f'datasource.valid={tiny_dataset["valid"]}', 'dataset.segment_duration=1.0']
    command = [sys.executable, '-m', 'scripts.cache_tokens', *overrides, '--no-progress']
    clips = sum(len(loaders.dataprep.read_manifest(tiny_dataset[s])) for s in ('train', 'valid'))
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f'{clips} clips encoded now, 0 already cached' in first.stdout and 'token_cache=true' in first.stdout
    assert list((tmp_path / 'home' / 'data' / 'tiny' / 'tokens').glob('*/shard-00000.npy'))
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert f'0 clips encoded now, {clips} already cached' in again.stdout
    missing = subprocess.run(command[:3], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count('\n') == 1 and 'dataset=NAME' in missing.stderr
