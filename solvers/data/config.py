"""What every preparation step shares: the settings of a run (PrepareConfig), fixed constants and DatasetError."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from solvers.errors import AudiogenError
from solvers.project import data_root, user_config_dir

SAMPLE_RATE = 16000  # AudioGen's EnCodec runs at 16 kHz mono
AUDIO_EXTS = frozenset({'.wav', '.flac', '.ogg', '.oga', '.opus', '.mp3', '.aif', '.aiff'})  # read by libsndfile
UNSUPPORTED_EXTS = frozenset({'.m4a', '.aac', '.wma', '.mp4', '.webm', '.3gp', '.amr', '.ape', '.wv'})
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_-]*$')
# The shortest clip kept by default: two frames of the 16 kHz codec (50 Hz). AudioGen pads short segments and
# audiocraft's loader keeps clips of any length, so clicks, blips and single hits are usable training data.
MIN_SECONDS = 0.04
# Where captions come from, most explicit first (solvers/data/captions.py reads them in this order by default).
CAPTION_SOURCES = ('metadata', 'tags', 'ucs', 'names')


class DatasetError(AudiogenError):
    """A problem with the arguments or the dataset as a whole; the message says what to do."""


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _hash_text(text: str, size: int = 8) -> str:
    return hashlib.blake2b(text.encode('utf-8'), digest_size=size).hexdigest()


@dataclass
class PrepareConfig:
    """Everything :func:`prepare` needs; the CLI maps one flag to one field.

    Args:
        dataset_dir: The user's folder (read only).
        name: Dataset name: ``egs/<name>/``, ``config/dataset/<name>.yaml``, ``data/<name>/``.
        out_dir: Where prepared WAVs and the report go (default ``<data root>/data/<name>``).
        egs_root: Root of the manifests (default ``<data root>/egs``).
        config_root: Folder of the ``dataset`` config group (default ``<data root>/config/dataset``); the data
            root is ``$AUDIOGEN_HOME``, else the project clone (see :mod:`solvers.project`).
        captions: Captions CSV/JSONL; by default top-level ``*.csv``/``*.jsonl`` files of the dataset are used.
        captions_from: Caption sources to try, in order: ``metadata`` (caption files), ``tags`` (embedded tags),
            ``ucs`` (Universal Category System names), ``names`` (folder and file names).
        valid_fraction: Share of source files that go to the valid split.
        workers: Worker processes; 1 converts in this process.
        min_seconds: Shorter clips are rejected.
        max_seconds: Longer clips are split into chunks.
        strict: Exit non-zero if any file is rejected.
        force: Overwrite an existing preset that differs from the one this run would write.
        progress: Show a progress bar (only on a terminal).
    """

    dataset_dir: Path
    name: str
    out_dir: Path | None = None
    egs_root: Path | None = None
    config_root: Path | None = None
    captions: Path | None = None
    captions_from: tuple[str, ...] = CAPTION_SOURCES
    valid_fraction: float = 0.1
    workers: int = 1
    min_seconds: float = MIN_SECONDS
    max_seconds: float = 30.0
    strict: bool = False
    force: bool = False
    progress: bool = True

    def resolved(self) -> PrepareConfig:
        """Return a copy with defaults filled in and paths made absolute; raise :class:`DatasetError` if invalid."""
        self._check_values()
        dataset_dir = Path(self.dataset_dir).expanduser().absolute()
        if not dataset_dir.is_dir():
            raise DatasetError(
                f'Dataset folder {dataset_dir} does not exist or is not a folder: pass the folder '
                'that holds your audio (and metadata/ or captions).'
            )
        out_dir = Path(self.out_dir or data_root() / 'data' / self.name).expanduser().absolute()
        real_data, real_out = os.path.realpath(dataset_dir), os.path.realpath(out_dir)
        if _is_within(real_out, real_data) or _is_within(real_data, real_out):
            raise DatasetError(
                f'Output folder {out_dir} and dataset folder {dataset_dir} overlap; the input must stay '
                'untouched and outputs must not be rescanned: pass --out somewhere else.'
            )
        captions = Path(self.captions).expanduser().absolute() if self.captions else None
        if captions is not None and not captions.is_file():
            raise DatasetError(f'Captions file {captions} does not exist: check the --captions path.')
        return PrepareConfig(
            dataset_dir=dataset_dir,
            name=self.name,
            out_dir=out_dir,
            egs_root=Path(self.egs_root or data_root() / 'egs').expanduser().absolute(),
            config_root=Path(self.config_root or user_config_dir() / 'dataset').expanduser().absolute(),
            captions=captions,
            captions_from=tuple(self.captions_from),
            valid_fraction=self.valid_fraction,
            workers=self.workers,
            min_seconds=self.min_seconds,
            max_seconds=self.max_seconds,
            strict=self.strict,
            force=self.force,
            progress=self.progress,
        )

    def _check_values(self) -> None:
        """Raise :class:`DatasetError` for a name, fraction, length or worker count that cannot work."""
        if not NAME_RE.match(self.name):
            raise DatasetError(
                f'--name {self.name!r} is not usable as a file and config name: use letters, digits, '
                "'_' and '-' only, starting with a letter or digit (e.g. --name my_sounds)."
            )
        if not 0.0 < self.valid_fraction < 1.0:
            raise DatasetError(f'--valid-fraction must be between 0 and 1 (exclusive), got {self.valid_fraction}.')
        if self.min_seconds <= 0 or self.max_seconds <= 0 or self.min_seconds > self.max_seconds:
            raise DatasetError(
                f'--min-seconds ({self.min_seconds}) and --max-seconds ({self.max_seconds}) must be '
                'positive with min <= max.'
            )
        unknown = [s for s in self.captions_from if s not in CAPTION_SOURCES]
        if unknown or not self.captions_from or len(set(self.captions_from)) != len(self.captions_from):
            raise DatasetError(
                f'--captions-from {",".join(self.captions_from)!r} is not usable: give one or more of '
                f'{",".join(CAPTION_SOURCES)}, each once, in the order to try them (e.g. --captions-from tags,names).'
            )
        if self.workers < 1:
            raise DatasetError(f'--workers must be at least 1, got {self.workers}.')
