"""The output folder's bookkeeping: its lock, the state journal that makes re-runs incremental, and clean-up."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from solvers import atomic
from solvers.data.config import DatasetError

STATE_FILE = '.prepare_state.jsonl'
LOCK_FILE = '.prepare.lock'
WAV_SUBDIR = 'wav'
STATE_VERSION = 2  # 2: records hold the file's stat, tags, audio hash and split


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for the ``with`` block; raise :class:`DatasetError` if a run holds it."""
    lock_fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f'Another prepare_dataset run is using {out_dir}; wait for it to finish.') from None
        yield
    finally:
        os.close(lock_fd)


def remove_temp_files(*folders: Path) -> None:
    """Delete the hidden ``.*.tmp`` files a run that crashed left in ``folders``."""
    for folder in folders:
        for tmp in folder.glob('.*.tmp'):
            tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """Read the state journal; the last record of each source wins and a torn last line is ignored."""
    records: dict[str, dict[str, Any]] = {}
    try:
        journal = open(path, 'rb')  # line by line: a library's journal is tens of MB, never held whole
    except FileNotFoundError:
        return records
    with journal:
        for line in journal:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and rec.get('v') == STATE_VERSION and 'rel' in rec:
                records[rec['rel']] = rec
    return records


def append_record(journal: BinaryIO, record: dict[str, Any]) -> None:
    """Append one state record to the open journal and flush it, so that a killed run keeps what it finished."""
    journal.write((json.dumps(record) + '\n').encode('utf-8'))
    journal.flush()


def write_state(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """Compact the journal to ``records``, the current sources, in one atomic write."""
    with atomic.open_atomic(path, 'w', encoding='utf-8') as f:  # streamed: never the whole journal in memory
        for rel in sorted(records):
            f.write(json.dumps(records[rel]) + '\n')


def remove_stale_outputs(wav_dir: Path, kept: dict[str, dict[str, Any]]) -> int:
    """Delete the files of ``wav_dir`` that no source with usable audio produces, then persist the folder.

    Outputs of files that were deleted, renamed or re-cut go, so that no manifest can point at them. Those of a
    duplicate or an uncaptioned file stay (they are in no manifest), so that a re-run does not convert it again.

    Returns:
        How many files were deleted.
    """
    live = {o['name'] for r in kept.values() for o in r['outputs']}
    live |= {Path(n).stem + '.json' for n in live}
    stale = [p for p in wav_dir.iterdir() if p.is_file() and p.name not in live and not p.name.startswith('.')]
    for p in stale:
        p.unlink()
    atomic.fsync_dir(wav_dir)
    return len(stale)
