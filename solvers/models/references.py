"""Model references, resolved in one place: an HF id, a package dir or bare package name, an export, an XP
signature or folder, a checkpoint file.

Used by generate and evaluate (``--model``, through :func:`generation.resolve_model`), export (the XP to export) and
the solver (``continue_from``). Package directories themselves are checked by :func:`package.resolve`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from solvers import project
from solvers.errors import AudiogenError
from solvers.models import package

_SIG = re.compile(r'^[0-9a-f]{8}$')
KINDS = ('xp', 'package', 'hub')


class ReferenceError(AudiogenError, RuntimeError):
    """A model reference names nothing this project can load; the message lists what it accepts."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a reference names.

    Attributes:
        given: the reference as the user wrote it.
        kind: ``xp`` (a training XP folder), ``package`` (a local package or export dir) or ``hub`` (an HF id).
        path: the XP folder or package dir (absolute), or the HF id.
    """

    given: str
    kind: str
    path: str

    @property
    def sig(self) -> str | None:
        """The XP's Dora signature (its folder's name)."""
        return Path(self.path).name if self.kind == 'xp' else None


def xps_dir() -> Path:
    """Where XP folders live: ``<outputs>/xps`` (``AUDIOGEN_OUTPUTS`` overrides the outputs root)."""
    return project.outputs_dir() / 'xps'


def looks_like_sig(text: str) -> bool:
    """True for strings shaped like a Dora signature (8 lowercase hex digits), optionally as ``//sig/<sig>``."""
    return bool(_SIG.match(text.removeprefix('//sig/')))


def find_xp(spec: str | os.PathLike) -> Path | None:
    """The XP folder ``spec`` names (a folder holding ``checkpoint.th``, or a signature), else None.

    Raises:
        ReferenceError: ``spec`` is shaped like a signature but no such XP exists.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve() if _has_checkpoint(path) else None
    if looks_like_sig(text):
        sig = text.removeprefix('//sig/')
        folder = xps_dir() / sig
        if _has_checkpoint(folder):
            return folder
        raise ReferenceError(
            f'No XP with signature {sig}: {folder} {"has no checkpoint" if folder.is_dir() else "does not exist"}. '
            f'XPs are looked up under {xps_dir()} (set AUDIOGEN_OUTPUTS to the outputs root of the run, or pass '
            'the XP folder itself).'
        )
    return None


def _has_checkpoint(folder: Path) -> bool:
    return (folder / 'checkpoint.th').is_file() or (folder / 'checkpoint_best.th').is_file()


def resolve(spec: str) -> Reference:
    """Classify a model reference: an XP (folder or signature), a package dir or bare name, or an HF id.

    Raises:
        ReferenceError: it names none of them (the message says what was looked for).
        package.PackageError: a package dir that lacks a package's files.
    """
    spec = str(spec).strip()
    if not spec:
        raise ReferenceError('The model reference is empty: pass an HF id, a package directory, or an XP signature.')
    folder = find_xp(spec)
    if folder is not None:
        return Reference(given=spec, kind='xp', path=str(folder))
    path = Path(spec).expanduser()
    if not path.is_dir():
        path = package.local_package(spec) or path  # a bare name, as in `pretrained=tiny`
    if path.is_dir():
        return Reference(given=spec, kind='package', path=package.resolve(path))
    if package.is_hub_id(spec):
        return Reference(given=spec, kind='hub', path=spec)
    raise ReferenceError(
        f"Unknown model '{spec}': it is not a directory (looked for {path.resolve()}), not the signature of an XP "
        f'under {xps_dir()}, not a package under {package.local_packages_dir()}, and not a Hugging Face id '
        '(owner/name). Pass facebook/audiogen-medium, a package directory (state_dict.bin + '
        'compression_state_dict.bin, e.g. from scripts/export.py), or an XP signature/folder (set AUDIOGEN_OUTPUTS '
        'if the run wrote its XPs elsewhere).'
    )


def continue_source(value: str, pretrained: str) -> str:
    """What ``continue_from`` names, for the solver's ``load_from_pretrained``: a checkpoint file, or a package.

    ``//sig/<sig>`` and XP folders give the XP's ``checkpoint.th``; a file is a checkpoint; a package dir or HF id
    is another pretrained package.
    """
    if value == pretrained:
        return value
    text = str(value)
    path = xps_dir() / text[len('//sig/') :] if text.startswith('//sig/') else project.resolve_path(text)
    if path.is_dir() and (path / 'checkpoint.th').is_file():
        return str(path / 'checkpoint.th')
    if path.is_file():
        return str(path)
    if path.is_dir() or package.is_hub_id(text):
        return text  # another pretrained package
    raise ReferenceError(
        f'continue_from={text}: no checkpoint at {path}. Use //sig/<signature> of a past XP, an XP folder, a '
        'checkpoint file or a pretrained package.'
    )
