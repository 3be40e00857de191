"""Preemption and Ctrl-C: a stop signal becomes "checkpoint at the next update boundary, then exit".

SLURM preemption and ``scontrol requeue`` send SIGTERM, submitit's pre-timeout signal is SIGUSR2, and a terminal's
Ctrl-C is SIGINT. :class:`StopSignals` only records them while the solver runs; the training loop asks
:attr:`StopSignals.pending` at each update boundary, writes a step checkpoint, then calls
:meth:`StopSignals.stop_if_signalled`, which hands the signal to the previous handler (submitit's requeues the job)
and exits with 128 + signal. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import typing as tp

from solvers.training.slurm import hand_over_to_submitit

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopSignals:
    """A context that records SIGTERM, SIGUSR2 and a first SIGINT instead of dying of them.

    Attributes:
        pending: the signal waiting for the next update boundary, or None.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, tp.Any] = {}

    def __enter__(self) -> StopSignals:
        self.previous = {int(sig): signal.signal(sig, self.on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def on_signal(self, signum: int, frame: tp.Any = None) -> None:
        """The handler: remember the signal (a second Ctrl-C raises KeyboardInterrupt: the user wants out now)."""
        if signum == signal.SIGINT:
            if self.pending == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            logger.warning(
                'Received Ctrl-C: checkpointing at the next update, then stopping (Ctrl-C again to '
                'stop now, losing the updates since the last checkpoint).'
            )
        else:
            logger.warning('Received %s: checkpointing at the next update, then stopping.', signal.Signals(signum).name)
        self.pending = signum

    def stop_if_signalled(self, saved: str) -> None:
        """After a checkpoint boundary: hand over to the previous handler (submitit requeues), then exit.

        Args:
            saved: what the checkpoint holds, for the log line (e.g. ``update 3 of epoch 2 is checkpointed``).
        Raises:
            SystemExit: with 128 + the signal, when one is pending.
        """
        signum = self.pending
        if signum is None:
            return
        logger.warning(
            'Stopping on %s; %s. Re-run the same command (SLURM requeues it) to resume.',
            signal.Signals(signum).name,
            saved,
        )
        handler = self.previous.get(signum)
        if callable(handler) and signum != signal.SIGINT:  # Python's SIGINT handler would raise a traceback
            hand_over_to_submitit(handler, signum)  # submitit's checkpoint_and_try_requeue requeues and exits
        raise SystemExit(128 + signum)

    def batches_until_stopped(self, batches: tp.Iterable) -> tp.Iterator:
        """``batches``, ended early when the loader fails after a stop signal.

        A terminal's Ctrl-C reaches the loader's workers too. They ignore it once started
        (:func:`worker_ignores_ctrl_c`), but one still starting can die of it; the loop then stops at the update
        boundary it is on, which the caller checkpoints.
        """
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:
                if self.pending is None:
                    raise
                logger.warning('The data loader stopped with the signal (%s).', str(err).splitlines()[0][:200])
                return
            yield batch


def worker_ignores_ctrl_c(worker_id: int, chained: tp.Callable[[int], None] | None = None) -> None:
    """A data-loader worker's start: ignore SIGINT, which a terminal's Ctrl-C sends to the whole process group.

    The main process turns a first Ctrl-C into "checkpoint at the next update, then stop" and still needs its
    workers' batches until then; a worker that died of it would fail the loader instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if chained is not None:
        chained(worker_id)
