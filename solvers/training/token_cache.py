"""The token cache: every prepared clip encoded once by the package's codec, read back in token space by training.

Layout, beside the dataset under the data root (:func:`solvers.project.data_root`)::

    <root>/data/<name>/tokens/<codec checksum>/
        index.json           one entry per clip: its key, shard, first frame, frames, samples (written atomically)
        shard-00000.npy ...  int16 arrays (n_q, frames): clips end to end, memory-mapped by the readers

A clip's key is its path, size, modification time and the padded length it was encoded at, so a re-prepared or added
clip is encoded again and nothing else is; another codec (another checksum of its weights) gets another folder. A
build writes a shard every ``shard_frames`` frames and the index after each shard, so a Ctrl-C or an error keeps
every completed shard and the next build goes on from there. A shard is deleted once none of its clips is listed any
more; until then it keeps the frames of its removed clips (a clean rebuild: delete the folder).

What is stored: a clip no longer than the segment is zero-padded to the segment and encoded, exactly the audio that
audiocraft's AudioDataset hands the codec for that clip at offset 0 (so its tokens are identical); a longer clip is
encoded whole. A segment of a longer clip read from the cache therefore carries tokens computed with the audio
around it in view (EnCodec's convolutions and LSTM see past the segment's edges), where the uncached path encodes
the segment alone: the tokens differ in the frames near the segment's edges. Frames past the stored ones (the
padding of a segment that starts late in a clip) hold the codec's tokens of silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from solvers import atomic, project
from solvers.data import manifests
from solvers.errors import AudiogenError

logger = logging.getLogger(__name__)

INDEX_FILE = 'index.json'
INDEX_VERSION = 1
SHARD_FRAMES = 1 << 21  # 2M frames of 4 int16 codes: 16 MB and 11.6 h of audio at 50 Hz per shard
SPLITS = ('train', 'valid', 'evaluate', 'generate')


class TokenCacheError(AudiogenError, RuntimeError):
    """The token cache can't be built or read; the message says which file and what to do."""


@dataclass(frozen=True)
class Clip:
    """One prepared clip to encode: its path and the key its tokens are stored under."""

    path: str
    key: str
    target_samples: int  # the clip is zero-padded to this length before encoding (0: encoded as it is)


def build_for_config(cfg: tp.Any, codec: tp.Any, progress: bool = True, **kwargs: tp.Any) -> BuildReport:
    """Build (or bring up to date) the cache of the dataset ``cfg`` trains on, for ``codec``.

    Args:
        cfg: the solver config, ``datasource`` paths absolute.
        codec: the package's codec.
        progress: show a progress bar.
        kwargs: passed to :func:`build` (``shard_frames``).
    """
    segment_samples = int(float(cfg.dataset.segment_duration) * int(codec.sample_rate))
    clips = manifest_clips(cfg, segment_samples)
    folder = cache_dir(dataset_name(cfg), codec_checksum(codec))
    return build(codec, clips, folder, progress=progress, **kwargs)


def codec_checksum(codec: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the codec's weights (names, shapes and bytes), its cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        digest.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_name(cfg: tp.Any) -> str:
    """The dataset's name: the folder above its train manifest's split folder (``egs/<name>/train``)."""
    return Path(str(cfg.datasource.train)).parent.name


def cache_dir(name: str, checksum: str) -> Path:
    """``<data root>/data/<name>/tokens/<codec checksum>``."""
    return project.data_root() / 'data' / name / 'tokens' / checksum


def manifest_clips(cfg: tp.Any, segment_samples: int) -> list[Clip]:
    """The clips of every split's manifest in ``cfg.datasource`` (each once), with their keys.

    Args:
        cfg: a config whose ``datasource`` paths are absolute (as ``solvers/train.py`` resolves them).
        segment_samples: the training segment in samples; shorter clips are stored padded to it.
    """
    seen: dict[str, Clip] = {}
    for split in SPLITS:
        path = cfg.datasource.get(split)
        if not isinstance(path, str):
            continue
        for entry in manifests.read_manifest(path):
            clip_path = str(entry['path'])
            if clip_path not in seen:
                seen[clip_path] = clip_for(
                    clip_path, float(entry['duration']), int(entry['sample_rate']), segment_samples
                )
    return list(seen.values())


def clip_for(path: str, duration: float, sample_rate: int, segment_samples: int) -> Clip:
    """A clip's key: path, size, mtime and the length it is padded to (changes when the file or segment does)."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise TokenCacheError(
            f'Cannot read {path} ({err.strerror}): the manifest lists a clip that is gone. Prepare the dataset again '
            '(python -m scripts.prepare_dataset DIR --name NAME), then rebuild the cache.'
        ) from err
    target = segment_samples if duration * sample_rate <= segment_samples else 0
    key = hashlib.sha256(f'{path}|{stat.st_size}|{stat.st_mtime_ns}|{target}'.encode()).hexdigest()[:20]
    return Clip(path, key, target)


def read_index(folder: Path) -> dict:
    """The cache's index (an empty one when the folder has none yet)."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return {'version': INDEX_VERSION, 'clips': {}, 'shards': []}
    try:
        index = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as err:
        raise TokenCacheError(
            f'Cannot read the token cache index {path} ({err}): delete {folder} and rebuild it.'
        ) from err
    if index.get('version') != INDEX_VERSION:
        raise TokenCacheError(f'{path} is from another version of the token cache: delete {folder} and rebuild it.')
    return index


@torch.no_grad()
def encode_clip(codec: tp.Any, path: str, target_samples: int) -> tuple[np.ndarray, int]:
    """The int16 tokens ``(n_q, frames)`` of one clip (zero-padded to ``target_samples`` first), and its samples.

    The clip is read and converted as audiocraft's AudioDataset reads it (``audio_read`` + ``convert_audio`` to the
    codec's rate and channels) and encoded alone, a batch of one.
    """
    from audiocraft.data.audio import audio_read
    from audiocraft.data.audio_utils import convert_audio

    wav, rate = audio_read(path, pad=False)
    wav = convert_audio(wav, rate, int(codec.sample_rate), int(codec.channels))
    samples = int(wav.shape[-1])
    if samples < target_samples:
        wav = torch.nn.functional.pad(wav, (0, target_samples - samples))
    device = next(iter(codec.parameters())).device
    codes, scale = codec.encode(wav[None].to(device))
    if scale is not None:
        raise TokenCacheError('The package codec returns a scale: the token cache supports unscaled codecs only.')
    return codes[0].to(torch.int16).cpu().numpy(), samples


@torch.no_grad()
def silence_tokens(codec: tp.Any) -> list[int]:
    """The codec's tokens for silence: the middle frame of one second of zeros (past the edges' context)."""
    device = next(iter(codec.parameters())).device
    zeros = torch.zeros(1, int(codec.channels), int(codec.sample_rate), device=device)
    codes, _ = codec.encode(zeros)
    return [int(c) for c in codes[0, :, codes.shape[-1] // 2]]


def _write_shard(folder: Path, index: dict, pending: list[tuple[Clip, np.ndarray, int]]) -> None:
    """Write one shard holding ``pending`` end to end, then the index naming it (both atomically)."""
    number = max((int(name[6:11]) for name in index['shards']), default=-1) + 1
    name = f'shard-{number:05d}.npy'
    with atomic.open_atomic(folder / name, 'wb', sync_dir=False) as f:
        np.save(f, np.concatenate([codes for _, codes, _ in pending], axis=1))
    start = 0
    for clip, codes, samples in pending:
        index['clips'][clip.key] = {
            'path': clip.path,
            'shard': name,
            'start': start,
            'frames': int(codes.shape[1]),
            'samples': samples,
        }
        start += int(codes.shape[1])
    index['shards'].append(name)
    atomic.write_json(folder / INDEX_FILE, index)


@dataclass
class BuildReport:
    """What a build did: clips encoded now, clips found in the cache, entries dropped, and the cache's folder."""

    encoded: int
    kept: int
    removed: int
    folder: Path


def build(
    codec: tp.Any, clips: tp.Sequence[Clip], folder: Path, shard_frames: int = SHARD_FRAMES, progress: bool = True
) -> BuildReport:
    """Encode the clips the cache lacks into new shards; drop the entries of clips no longer listed.

    Holds an exclusive lock on the folder (a second build, e.g. another DDP rank or a CLI, waits, then finds the
    clips encoded). A Ctrl-C or an error keeps the shards already written, and the index that names them.

    Args:
        codec: the package's codec (:func:`solvers.models.package.load_compression_model`), in eval mode.
        clips: the clips to hold (:func:`manifest_clips`).
        folder: the cache folder (:func:`cache_dir`).
        shard_frames: frames per shard: a shard is written (and the work before it kept) each time this many are
            encoded.
        progress: show a progress bar on stderr.
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        for stale in atomic.stale_temporaries(folder):
            stale.unlink(missing_ok=True)
        index = read_index(folder)
        if 'frame_rate' not in index:
            index.update(
                frame_rate=float(codec.frame_rate),
                sample_rate=int(codec.sample_rate),
                n_q=int(codec.num_codebooks),
                silence=silence_tokens(codec),
            )
        removed = _prune(folder, index, {clip.key for clip in clips})
        missing = [clip for clip in clips if clip.key not in index['clips']]
        pending: list[tuple[Clip, np.ndarray, int]] = []
        frames = 0
        with tqdm(total=len(missing), unit='clip', desc='encoding', disable=not progress, dynamic_ncols=True) as bar:
            for clip in missing:
                codes, samples = encode_clip(codec, clip.path, clip.target_samples)
                pending.append((clip, codes, samples))
                frames += int(codes.shape[1])
                if frames >= shard_frames:
                    _write_shard(folder, index, pending)
                    pending, frames = [], 0
                bar.update()
        if pending:
            _write_shard(folder, index, pending)
        elif not (folder / INDEX_FILE).is_file():
            atomic.write_json(folder / INDEX_FILE, index)
        atomic.fsync_dir(folder)
    return BuildReport(len(missing), len(clips) - len(missing), removed, folder)


def _prune(folder: Path, index: dict, wanted: set[str]) -> int:
    """Drop index entries not in ``wanted``, then the shards no entry uses (index first: it never names a gone
    shard); return the entries dropped."""
    stale = [key for key in index['clips'] if key not in wanted]
    for key in stale:
        del index['clips'][key]
    used = {entry['shard'] for entry in index['clips'].values()}
    unused = [name for name in index['shards'] if name not in used]
    if stale or unused:
        index['shards'] = [name for name in index['shards'] if name in used]
        atomic.write_json(folder / INDEX_FILE, index)
        for name in unused:
            (folder / name).unlink(missing_ok=True)
    return len(stale)


class _locked:
    """An exclusive ``flock`` on ``<folder>/.lock`` for a ``with`` block; waits for another holder to finish."""

    def __init__(self, folder: Path):
        self.path = folder / '.lock'

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: tp.Any) -> None:
        os.close(self.fd)  # closing releases the lock


class TokenCache:
    """Reads a built cache: a clip's stored tokens by path, memory-mapped from its shard (opened lazily, once per
    process, so a reader pickles into loader workers without its maps)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = read_index(folder)
        if 'frame_rate' not in index:
            raise TokenCacheError(f'No token cache in {folder}: build it with python -m scripts.cache_tokens.')
        self.frame_rate, self.sample_rate = float(index['frame_rate']), int(index['sample_rate'])
        self.silence = torch.tensor(index['silence'], dtype=torch.int16)[:, None]
        self.entries = {entry['path']: entry for entry in index['clips'].values()}
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_maps': {}}

    def __len__(self) -> int:
        return len(self.entries)

    def samples(self, path: str) -> int:
        """The clip's length in samples at the codec's rate."""
        return int(self._entry(path)['samples'])

    def window(self, path: str, first: int, frames: int) -> torch.Tensor:
        """Tokens ``[first, first + frames)`` of a clip as int16 ``(n_q, frames)``; frames past the stored ones are
        the codec's tokens of silence."""
        entry = self._entry(path)
        shard = self._maps.get(entry['shard'])
        if shard is None:
            shard = self._maps[entry['shard']] = np.load(self.folder / entry['shard'], mmap_mode='r')
        stop = min(first + frames, entry['frames'])
        stored = torch.from_numpy(np.array(shard[:, entry['start'] + first : entry['start'] + max(stop, first)]))
        if stored.shape[1] == frames:
            return stored
        return torch.cat([stored, self.silence.expand(-1, frames - stored.shape[1])], dim=1)

    def _entry(self, path: str) -> dict:
        entry = self.entries.get(path)
        if entry is None:
            raise TokenCacheError(
                f'{path} is not in the token cache {self.folder}: rebuild it with python -m scripts.cache_tokens '
                '(the same overrides as the run).'
            )
        return entry


def segment_frames(segment_samples: int, sample_rate: int, frame_rate: float) -> int:
    """Frames the codec makes of one segment: one per hop, the last hop padded (EnCodec's padding)."""
    return math.ceil(segment_samples * frame_rate / sample_rate)


def open_for_run(cfg: tp.Any, codec: tp.Any) -> TokenCache:
    """The cache a training run reads: rank 0 brings it up to date (encoding what is missing), the others wait.

    Args:
        cfg: the solver config (``datasource`` paths absolute, ``dataset.segment_duration``).
        codec: the package's codec.
    """
    import flashy

    if flashy.distrib.is_rank_zero():
        report = build_for_config(cfg, codec, progress=False)
        logger.info(
            'Token cache %s: %d clips encoded now, %d read from the cache, %d stale entries dropped.',
            report.folder,
            report.encoded,
            report.kept,
            report.removed,
        )
    flashy.distrib.barrier()
    return TokenCache(cache_dir(dataset_name(cfg), codec_checksum(codec)))


class CachedCodes:
    """Stands in for the codec while audiocraft's ``_prepare_tokens_and_attributes`` reads a token-cache batch: its
    "audio" is already the codes, so ``encode`` hands them back (as the int64 codes the codec returns)."""

    def __init__(self, codec: tp.Any):
        self.frame_rate = codec.frame_rate
        self.sample_rate = codec.sample_rate

    def encode(self, codes: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The codes, as int64."""
        return codes.long(), None


@contextlib.contextmanager
def codes_in_place_of_codec(solver: tp.Any, batch: tp.Any) -> tp.Iterator[None]:
    """While the block runs, ``solver.compression_model`` is :class:`CachedCodes` when ``batch`` holds the token
    cache's integer codes (audio batches leave the codec in place)."""
    if batch[0].dtype.is_floating_point:
        yield
        return
    codec = solver.compression_model
    solver.compression_model = CachedCodes(codec)
    try:
        yield
    finally:
        solver.compression_model = codec


def build_from_overrides(overrides: tp.Sequence[str], progress: bool = True, **kwargs: tp.Any) -> BuildReport:
    """Compose the config as ``dora run <overrides>`` does, load its package's codec, and build the token cache.

    The codec runs on ``device`` of the config when it is available, else on the CPU.

    Args:
        overrides: ``dora run`` overrides, e.g. ``['dataset=mysounds']``.
        progress: show a progress bar.
        kwargs: passed to :func:`build` (``shard_frames``).
    """
    from solvers.models import package

    cfg = project.compose(overrides)
    if not cfg.datasource.train:
        raise TokenCacheError('No dataset chosen: pass dataset=NAME (a dataset prepared by scripts/prepare_dataset).')
    for split in SPLITS:
        path = cfg.datasource.get(split)
        if isinstance(path, str):
            cfg.datasource[split] = str(project.resolve_path(path))
    device = str(cfg.device) if torch.cuda.is_available() or not str(cfg.device).startswith('cuda') else 'cpu'
    pkg = package.resolve(cfg.pretrained, base_dir=project.resolve_path('.'))
    codec = package.load_compression_model(pkg, device)
    return build_for_config(cfg, codec, progress=progress, **kwargs)
