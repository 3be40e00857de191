"""Plain, quiet training logs: no colour codes where nobody sees colours, none of audiocraft's empty lines.

flashy's ``setup_logging`` colours every line (colorlog) and flashy's summaries embed bold codes in the message, in the
terminal, in pipes and in ``solver.log.0`` alike. audiocraft 1.3's base solver also logs lines that say nothing on
our runs: a memory estimate of 0.00 GB for a small model, ``Ignoring keys when loading best []``, the hash of the model
before its weights are loaded, and the EMA's initialisation twice (again after loading the package's weights).
"""

from __future__ import annotations

import logging
import os
import re
import typing as tp

ANSI = re.compile(r'\x1b\[[0-9;]*m')
PLAIN_FORMAT = '[%(asctime)s][%(name)s][%(levelname)s] - %(message)s'


class PlainFormatter(logging.Formatter):
    """flashy's layout without colour codes, in the line or in the message."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT, datefmt='%m-%d %H:%M:%S')

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub('', super().format(record))


class QuietFilter(logging.Filter):
    """Drops audiocraft's zero, empty and repeated diagnostic lines (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.restored = False  # audiocraft logs 'Restoring weights and history.' before it loads them
        self.once: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ''
        args = record.args if isinstance(record.args, tuple) else ()
        if msg.startswith('Restoring weights'):
            self.restored = True
        if msg.startswith('Base memory usage') and args and float(tp.cast(float, args[0])) < 0.005:
            return False
        if msg.startswith('Ignoring keys when loading best') and args and not args[0]:
            return False
        if msg.startswith('Model hash') and not self.restored:
            return False  # the hash of the freshly built model: the one after loading follows
        if msg.startswith(('Initializing EMA', 'optim.ema.updates=')):
            text = record.getMessage()
            if text in self.once:
                return False
            self.once.add(text)
        return True


def plain_logs() -> None:
    """Make the root logger's handlers (after ``flashy.setup_logging``) plain where needed, and quiet everywhere.

    Files and streams that are not a terminal (pipes, SLURM's output files) get no colour codes; so does a terminal
    when ``NO_COLOR`` is set.
    """
    quiet = QuietFilter()
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, 'stream', None)
        tty = stream is not None and hasattr(stream, 'isatty') and stream.isatty()
        if isinstance(handler, logging.FileHandler) or not tty or os.environ.get('NO_COLOR'):
            handler.setFormatter(PlainFormatter())
        handler.addFilter(quiet)
