"""The user cache of the demo's built artefacts (tiny codec, stand-in LM, demo classifier), keyed by their recipe.

Each artefact is a deterministic function of its recipe (hyper-parameters, seeds) and of the code that builds it, so
it is stored once under ``$AUDIOGEN_CACHE`` (default ``~/.cache/audiogen-finetune``, or ``$XDG_CACHE_HOME/...``) as
``<name>-<key>.pt``, where the key hashes the recipe, the source files of the builders and the torch/audiocraft
versions. Changing any of them builds a new file; nothing here is ever in git.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import typing as tp
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = 'AUDIOGEN_CACHE'


def cache_dir() -> Path:
    """``$AUDIOGEN_CACHE``, else ``$XDG_CACHE_HOME/audiogen-finetune`` (``~/.cache/audiogen-finetune``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser().resolve() / 'audiogen-finetune'


def recipe_key(recipe: dict, modules: tp.Sequence[ModuleType]) -> str:
    """A short hash of a recipe, of the source of the modules that build it and of the numeric libraries."""
    import audiocraft

    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    digest.update(f'torch {torch.__version__} audiocraft {audiocraft.__version__}'.encode())
    for module in modules:
        digest.update(Path(tp.cast(str, module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def load_or_build(
    name: str, recipe: dict, modules: tp.Sequence[ModuleType], build: tp.Callable[[], dict], what: str
) -> dict:
    """The cached artefact of ``recipe``, built by ``build()`` (and stored) when it isn't cached yet.

    Args:
        name: file name prefix, e.g. ``tiny_codec``.
        recipe: everything that determines the artefact besides the code (hashed into the file name).
        modules: the modules whose source determines the artefact.
        build: returns the artefact: a dict of tensors, numbers and strings (loaded back with weights_only).
        what: how to name the artefact in the progress line, e.g. ``the tiny codec``.
    """
    from solvers.atomic import save_torch
    from solvers.models.checkpoint_io import load_weights_only

    path = cache_dir() / f'{name}-{recipe_key(recipe, modules)}.pt'
    if path.is_file():
        try:
            state = load_weights_only(path, mmap=False)
            print(f'Using {what} cached in {path}', flush=True)
            return state
        except Exception as err:  # a truncated or foreign file: build it again
            logger.warning('Rebuilding %s: the cached %s is unreadable (%s).', what, path, err)
    print(f'Building {what} (once; cached in {path.parent}) ...', flush=True)
    begin = time.perf_counter()
    state = build()
    state = {**state, 'recipe': json.dumps(recipe, sort_keys=True, default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(state, path)
    print(f'Built {what} in {time.perf_counter() - begin:.0f} s.', flush=True)
    return state


class single_thread:
    """Run a block on one torch thread (deterministic, and immune to OpenMP spin-waits on a shared CPU)."""

    def __enter__(self) -> single_thread:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        torch.set_num_threads(self.previous)
