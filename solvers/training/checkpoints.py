"""Checkpoints that never lose work: atomic writes, safe loading, retention, RNG state for exact resume.

- Writes go through :mod:`solvers.atomic` (a temporary file, fsync, rename, fsync of the folder): a crash at any point
  leaves the previous checkpoint intact (flashy renames but never fsyncs).
- Loading goes through :mod:`solvers.models.checkpoint_io` (``weights_only=True``).
"""

from __future__ import annotations

import random
import typing as tp
from pathlib import Path

import numpy as np
import torch

from solvers import atomic
from solvers.models.checkpoint_io import CheckpointError, safe_load


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove temporary files left by a crash during a save (ours, those of earlier versions, and flashy's)."""
    older = [p for p in folder.glob('checkpoint*') if p.name.endswith(('.tmp', '.tmp.done'))]
    stale = [p for p in atomic.stale_temporaries(folder) if p.name.startswith('.checkpoint')] + older
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class RNGState:
    """The process' random generators (Python, NumPy, torch CPU and CUDA), plus named private ``torch.Generator``s
    (audiocraft's classifier-free-guidance and attribute dropouts draw from their own), as a state source.

    Args:
        generators: returns the private generators by name; their states are saved and restored too.
    """

    def __init__(self, generators: tp.Callable[[], dict[str, torch.Generator]] = dict):
        self.generators = generators

    def state_dict(self) -> dict:
        np_state: tp.Any = np.random.get_state()  # ('MT19937', keys, pos, has_gauss, cached_gaussian)
        state = {
            'python': random.getstate(),
            'numpy': {
                'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                'pos': int(np_state[2]),
                'has_gauss': int(np_state[3]),
                'cached_gaussian': float(np_state[4]),
            },
            'torch': torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        state['generators'] = {name: gen.get_state() for name, gen in self.generators().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        np_state = state['numpy']
        np.random.set_state(
            (
                'MT19937',
                np_state['keys'].numpy().astype(np.uint32),
                np_state['pos'],
                np_state['has_gauss'],
                np_state['cached_gaussian'],
            )
        )
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
        generators = self.generators()
        for name, gen_state in state.get('generators', {}).items():
            generators[name].set_state(gen_state)


class RunningMean:
    """Per-key running means that can be checkpointed mid-epoch (flashy's averager is a closure)."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict(state['sums']) if state else {}
        self.counts: dict[str, float] = dict(state['counts']) if state else {}

    def update(self, metrics: dict) -> dict:
        """Add one step's metrics and return the means so far."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0.0) + 1.0
        return self.value

    @property
    def value(self) -> dict:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def state_dict(self) -> dict:
        return {'sums': dict(self.sums), 'counts': dict(self.counts)}


class EpochPosition:
    """Where the current epoch stands, as registered solver state: a step checkpoint resumes from it exactly.

    Attributes:
        update: optimizer updates of the epoch already done (0: the epoch has not started; ``updates_per_epoch``: its
            training is done and the valid/evaluate/generate stages remain).
        epoch_rng: the RNG states at the start of the epoch (the loader draws its order and worker seeds from them).
        rng: the RNG states after ``update`` updates (dropout draws continue from there).
        average: running means of the epoch's metrics so far (see :class:`RunningMean`).
        bad_steps: consecutive non-finite steps so far.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to "the epoch has not started" (after an epoch is committed)."""
        self.update = 0
        self.epoch_rng: dict | None = None
        self.rng: dict | None = None
        self.average: dict = RunningMean().state_dict()
        self.bad_steps = 0

    def state_dict(self) -> dict:
        return {
            'update': self.update,
            'epoch_rng': self.epoch_rng,
            'rng': self.rng,
            'average': self.average,
            'bad_steps': self.bad_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.update = int(state.get('update', 0))
        self.epoch_rng = state.get('epoch_rng')
        self.rng = state.get('rng')
        self.average = state.get('average') or RunningMean().state_dict()
        self.bad_steps = int(state.get('bad_steps', 0))


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """True when ``err`` (or its cause) is a failed write because ``folder``'s filesystem is out of space.

    torch.save reports a full disk either as OSError(ENOSPC) or as a RuntimeError from its zip writer
    ("... file write failed"), which carries no errno: then the free space decides.
    """
    import errno
    import shutil

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if 'write failed' in str(err) or 'No space left' in str(err):
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line reports."""
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0] if text else ""}'


def size_text(path: Path) -> str:
    """Human size of a file, or 'as much as the last one' when it does not exist yet."""
    try:
        return (
            f'{path.stat().st_size / 2**30:.2f} GiB'
            if path.stat().st_size >= 2**30
            else f'{path.stat().st_size / 2**20:.1f} MiB'
        )
    except OSError:
        return 'as much as the model and optimizer state'


def describe_kept(folder: Path) -> str:
    """A sentence saying which checkpoint of an XP folder survives and which epoch it holds."""
    for name in ('checkpoint.th', 'checkpoint_step.th'):
        path = folder / name
        if path.is_file():
            try:
                history = safe_load(path, mmap=True).get('history', [])
            except CheckpointError:
                continue
            return f'{path} is intact and holds {len(history)} completed epoch(s).'
    return 'No earlier checkpoint exists: the re-run starts this XP from the pretrained weights.'


def module_generators(model: torch.nn.Module | None) -> dict[str, torch.Generator]:
    """Generators owned by modules (audiocraft's dropout modules seed their own), by module name: the private
    generators an :class:`RNGState` saves beside the global ones (none before the model exists)."""
    if model is None:
        return {}
    return {
        name: module.rng
        for name, module in model.named_modules()
        if isinstance(getattr(module, 'rng', None), torch.Generator)
    }
