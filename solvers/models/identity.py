"""What a pretrained package is, by content: checksums of its weight files and, for a hub package, its revision.

An XP pins the package it is fine-tuned from in ``<xp>/base.json`` when it starts (:func:`pin`). Resuming it, and
loading it to generate, evaluate or export (:func:`verify`, called by ``solvers/models/export.py:load_xp``), refuse
a package whose weights changed since: a LoRA checkpoint holds adapters only and every XP takes its codec from the
package, so a rebuilt package or another hub revision would silently change the model. Building a package over
another one (:func:`install`) refuses other contents unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import typing as tp
from pathlib import Path

from solvers.errors import AudiogenError
from solvers.models import package

BASE_FILE = 'base.json'
_CHUNK = 16 << 20
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_cache: dict[tuple[str, int, int], str] = {}
logger = logging.getLogger(__name__)


class BaseChangedError(AudiogenError):
    """The package an XP was fine-tuned from no longer holds the weights it had."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file; a hub blob's name is already its SHA-256 (git LFS), and a file is hashed once per process."""
    real = path.resolve()
    if _SHA256.match(real.name):
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        digest = hashlib.sha256()
        with open(real, 'rb') as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def _revision(path: Path) -> str | None:
    """The commit of a hub file: the ``snapshots/<commit>/`` folder the HF cache keeps it in."""
    parts = path.parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == 'snapshots' else None


def package_identity(pkg: str) -> dict:
    """The identity of a resolved package (:func:`solvers.models.package.resolve`).

    Returns:
        ``{'package', 'files': {name: sha256}, 'revision' (hub packages; else None), 'checksum'}``; an adapter export
        also has ``'base'``, its base package's identity, which its checksum covers.
    """
    names = [package.ADAPTER_FILE] if package.adapter_export(pkg) is not None else []
    names += [package.LM_FILE, package.COMPRESSION_FILE] if not names else []
    files, revision = {}, None
    for name in names:
        path = package._fetch(pkg, name)
        files[name] = file_sha256(path)
        revision = revision or (_revision(path) if package.is_hub_id(pkg) else None)
    out: dict[str, tp.Any] = {'package': pkg, 'files': files, 'revision': revision}
    if names == [package.ADAPTER_FILE]:
        out['base'] = package_identity(package.base_of(pkg))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode())
    if 'base' in out:
        digest.update(out['base']['checksum'].encode())
    out['checksum'] = digest.hexdigest()
    return out


def describe(identity: dict) -> str:
    """``'tiny' (checksum 3f1907a84bce)``, with the hub revision when there is one."""
    revision = f', revision {identity["revision"][:12]}' if identity.get('revision') else ''
    return f"'{identity['package']}' (weights checksum {identity['checksum'][:12]}{revision})"


def recorded(folder: str | os.PathLike) -> dict | None:
    """The identity an XP pinned, or None (an XP that never started, or one from before pins were kept)."""
    path = Path(folder) / BASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def pin(folder: str | os.PathLike, pkg: str, resuming: bool, write: bool = True) -> dict:
    """Record the package a new XP starts from; on a resume, check that it is still the same.

    Args:
        folder: the XP folder.
        pkg: the resolved package the XP is fine-tuned from.
        resuming: the XP has a checkpoint, so its pin (if any) must match; a new XP re-pins.
        write: write ``base.json`` (rank zero only in a multi-process run).
    Raises:
        BaseChangedError: resuming over a package whose weights changed.
    """
    identity = package_identity(pkg)
    if resuming:
        verify(folder, identity=identity)
    if write and (not resuming or recorded(folder) is None):
        from solvers.atomic import write_json

        write_json(Path(folder) / BASE_FILE, identity)
    logger.info('Base package %s, %s in %s.', describe(identity), 'as pinned' if resuming else 'pinned', BASE_FILE)
    return identity


def verify(folder: str | os.PathLike, pkg: str | None = None, identity: dict | None = None) -> None:
    """Refuse an XP whose base package changed since it started (nothing to check when it has no pin).

    Args:
        folder: the XP folder.
        pkg: the resolved package the XP names now (or pass its ``identity``).
        identity: :func:`package_identity` of it, when already computed.
    Raises:
        BaseChangedError: one line naming both packages and how to proceed.
    """
    pinned = recorded(folder)
    if pinned is None:
        return
    now = identity or package_identity(str(pkg))
    if pinned['checksum'] == now['checksum']:
        return
    raise BaseChangedError(
        f'XP {Path(folder).name} was fine-tuned from {describe(pinned)}, but it now holds other weights '
        f'({describe(now).split("(", 1)[1]}: '
        'its outputs would silently change. Put the original package back (the stand-ins rebuild identically: '
        'python -m scripts.make_tiny_package [--trained] --force; a hub model: its revision in the HF cache), or '
        f'move {folder} away to start this XP again from the new package.'
    )


def install(built: Path, dest: Path, force: bool, what: str) -> str:
    """Move a freshly built package into ``dest`` unless ``dest`` holds a package with other weights.

    Args:
        built: the new package's folder (removed here).
        dest: where it goes.
        force: replace a different package.
        what: the new package in words, for the messages.
    Returns:
        What happened, in one line.
    Raises:
        AudiogenError: ``dest`` holds a different package and ``force`` is false.
    """
    new = package_identity(str(built))
    old = package_identity(str(dest)) if (dest / package.LM_FILE).is_file() else None
    if old is not None and old['checksum'] == new['checksum']:
        shutil.rmtree(built)
        return f'{dest} already holds {what} (checksum {new["checksum"][:12]}): unchanged'
    if old is not None and not force:
        shutil.rmtree(built)
        raise AudiogenError(
            f'{dest} holds another package (checksum {old["checksum"][:12]}; {what} is {new["checksum"][:12]}), '
            'which XPs may have been fine-tuned from (they would refuse to load). Write it elsewhere (give a '
            'folder), or replace it with --force.'
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    built.rename(dest)
    return f'Tiny pretrained package written to {dest} ({what}; checksum {new["checksum"][:12]})'
