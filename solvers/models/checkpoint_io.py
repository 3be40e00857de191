"""The one checkpoint reader: `torch.load(weights_only=True)` for packages, exports, XP checkpoints and build caches.

Loading accepts tensors, numbers, strings and containers only. audiocraft/flashy checkpoints also pickle the Hydra
config object; we store it as YAML, and to read checkpoints written by stock audiocraft we allow exactly OmegaConf's
container and node classes, plain data holders whose unpickling runs no user code. Anything else (a pickled object
with a `__reduce__` payload) is refused before any of it runs.
"""

from __future__ import annotations

import collections
import os
import pickle
import typing as tp
from pathlib import Path

import torch

from solvers.errors import AudiogenError


class CheckpointError(AudiogenError, RuntimeError):
    """A checkpoint is unreadable, unsafe or incomplete."""


def omegaconf_safe_globals() -> list:
    """Classes a pickled OmegaConf config references, for `torch.serialization.safe_globals`."""
    from omegaconf import DictConfig, ListConfig, base, nodes

    node_types = [
        getattr(nodes, name)
        for name in (
            'AnyNode',
            'StringNode',
            'IntegerNode',
            'FloatNode',
            'BooleanNode',
            'BytesNode',
            'PathNode',
            'EnumNode',
        )
        if hasattr(nodes, name)
    ]
    return [
        DictConfig,
        ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        *node_types,
        tp.Any,
        dict,
        list,
        int,
        float,
        str,
        bool,
        collections.defaultdict,
    ]


def load_weights_only(path: str | os.PathLike, mmap: bool = True) -> tp.Any:
    """`torch.load(weights_only=True)` with the OmegaConf allowlist, memory-mapped when the file allows it.

    Memory-mapping keeps a medium checkpoint (~25 GB with its optimizer) off the heap until tensors are used; files
    written with the legacy (non-zip) serializer can't be mapped and are read whole.
    """
    with torch.serialization.safe_globals(omegaconf_safe_globals()):
        if mmap:
            try:
                return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as err:
                if 'mmap' not in str(err):
                    raise
        return torch.load(path, map_location='cpu', weights_only=True)


def safe_load(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``; raise CheckpointError naming the file on any problem.

    Args:
        path: the checkpoint.
        mmap: map tensors instead of reading them, for callers that only look at small entries (e.g. the history).
    """
    try:
        state = load_weights_only(path, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        raise CheckpointError(
            f'Refusing to load {path}: it holds pickled Python objects ({", ".join(unsafe) or err}) that could run '
            'code when loaded, and nothing in it was executed. Checkpoints written by this project hold only tensors '
            'and plain data; if you trust the file, convert it once in a separate script and re-save it.'
        ) from err
    except Exception as err:  # truncated zip, bad magic number, I/O errors
        raise CheckpointError(f'Checkpoint {path} is unreadable (truncated or corrupt?): {err}') from err
    if not isinstance(state, dict):
        raise CheckpointError(f'Checkpoint {path} holds a {type(state).__name__}, not a solver state dict.')
    return state


def _unsafe_globals(path: Path) -> list[str]:
    try:
        allowed = {f'{g.__module__}.{g.__qualname__}' for g in omegaconf_safe_globals() if hasattr(g, '__qualname__')}
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return []
