"""Atomic, durable file writes: every file the project writes goes through here.

A write goes to a hidden temporary file in the destination's folder, is fsync'ed, then renamed over the destination
(or, with ``overwrite=False``, hard-linked to it, which fails instead of replacing a file created meanwhile), and the
folder is fsync'ed. A crash at any point leaves either the previous file or the complete new one, plus at most a
``*.tmp`` file that :func:`stale_temporaries` finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

TMP_SUFFIX = '.tmp'


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename, a link or an unlink) to disk; a no-op where folders can't be fsync'ed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(
    path: str | os.PathLike,
    mode: str = 'wb',
    overwrite: bool = True,
    encoding: str | None = None,
    sync_dir: bool = True,
) -> tp.Iterator[tp.IO]:
    """A file object whose content appears at ``path`` whole, when the ``with`` block ends without an error.

    Args:
        path: the destination (its folder is created).
        mode: ``'wb'`` or ``'w'`` (text, with ``encoding``, UTF-8 by default).
        overwrite: replace an existing file; when False, raise FileExistsError instead.
        encoding: text encoding for ``mode='w'``.
        sync_dir: fsync the folder after the rename; a writer of many files in one folder passes False and calls
            :func:`fsync_dir` once at the end.
    """
    path = Path(path)
    if mode not in ('w', 'wb'):
        raise ValueError(f"open_atomic writes whole files: mode 'w' or 'wb', not {mode!r}.")
    if not overwrite and path.exists():
        raise FileExistsError(f'{path} already exists; refusing to overwrite it.')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TMP_SUFFIX, dir=path.parent)
    try:
        stream: tp.IO = os.fdopen(fd, 'w', encoding=encoding or 'utf-8') if mode == 'w' else os.fdopen(fd, 'wb')
        with stream as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True, sync_dir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with open_atomic(path, 'wb', overwrite, sync_dir=sync_dir) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    with open_atomic(path, 'w', overwrite) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: tp.Any, overwrite: bool = True) -> Path:
    """Write ``data`` as indented UTF-8 JSON (NaN refused) with a final newline, atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + '\n', overwrite)


def save_torch(state: tp.Any, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``state`` to ``path``, atomically (checkpoints, packages, cached artefacts)."""
    import torch

    with open_atomic(path, 'wb') as f:
        torch.save(state, f)
    return Path(path)


@contextlib.contextmanager
def open_dir(path: str | os.PathLike) -> tp.Iterator[Path]:
    """A temporary folder to fill, which replaces ``path`` whole when the ``with`` block ends without an error.

    An existing ``path`` is moved aside first and deleted once the new folder is in place, so a crash leaves the old
    folder or the new one (or, between the two renames, the old one under a hidden ``.<name>.*.old`` beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, 'rb') as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; packages and exports are meant to be shared
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.old', dir=path.parent))
            os.rename(path, aside / path.name)
            os.rename(tmp, path)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def new_dir(parent: str | os.PathLike, name: str, attempts: int = 10_000) -> Path:
    """Create and return ``parent/name``, or ``name-1``, ``name-2``... when taken (two runs never share one).

    Raises:
        FileExistsError: all ``attempts`` names are taken.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(attempts):
        folder = parent / (name if n == 0 else f'{name}-{n}')
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f'{attempts} folders named {name} or {name}-N already exist in {parent}')


def remove(path: str | os.PathLike) -> None:
    """Delete a file durably (a no-op when it is absent)."""
    path = Path(path)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files that writes interrupted by a crash left in ``folder``."""
    return sorted(p for p in Path(folder).glob(f'.*{TMP_SUFFIX}') if p.is_file())
