"""An XP folder's life before its first update: is it new, and forgetting it when a config error stops the run.

Dora makes the XP folder before our code runs. A run refused before it trained anything (a package that doesn't
match the config, a bad key read while building) must not leave a folder, nor an empty TensorBoard run in
``<outputs>/tensorboard/`` (solvers/training/curves.py links one per XP), that looks like an XP that ran.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def is_fresh(folder: Path) -> bool:
    """True when the XP holds nothing a run produced: no checkpoint, no history, no samples."""
    produced = ('checkpoint*.th', 'history.json', 'samples', 'evaluations')
    return not any(any(folder.glob(pattern)) for pattern in produced)


def forget(folder: Path, outputs: Path) -> None:
    """Remove a fresh XP folder and the TensorBoard links that point into it.

    Args:
        folder: the XP folder (checked fresh again: a concurrent run may have written since).
        outputs: the outputs root holding ``tensorboard/``.
    """
    if not folder.is_dir() or not is_fresh(folder):
        return
    index = outputs / 'tensorboard'
    for link in index.iterdir() if index.is_dir() else ():
        if link.is_symlink() and Path(os.readlink(link)).is_relative_to(folder):
            link.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
