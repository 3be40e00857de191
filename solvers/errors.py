"""The one base class of errors a user can fix, and the CLI wrapper that prints them as one line and exits 2."""

from __future__ import annotations

import sys
import typing as tp

USER_ERROR = 2  # the exit status of every refusal a user can fix: CLIs, `dora run` (config or data), the scripts


class AudiogenError(Exception):
    """A problem the user can fix (bad input, a missing file, a config mistake).

    The message is one or a few sentences saying what is wrong, where (file, key, line) and what to do. CLIs print
    it without a traceback (see :func:`run_cli`); the training entry point does the same.
    """


def run_cli(prog: str, body: tp.Callable[[], int], interrupted: str = 'interrupted.') -> int:
    """Run a CLI body; an :class:`AudiogenError` becomes ``prog: error: <message>`` on stderr and exit status 2.

    Args:
        prog: the program name printed before the message.
        body: the command's work; returns its exit status.
        interrupted: what a Ctrl-C left behind, printed as ``prog: <interrupted>`` with exit status 130.
    """
    try:
        return body()
    except AudiogenError as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f'{prog}: {interrupted}', file=sys.stderr)
        return 130
