"""Graceful stop on SIGTERM (a scheduler's pre-emption, ``timeout``, ``kill``): training finishes its current
iteration, writes a resumable checkpoint and exits, instead of losing the work since the last periodic one."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "TrainingInterrupted", "ignore_sigterm_in_worker"]


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM.

    ``timeout``, Slurm and a terminal signal the whole process group, workers included. A worker that
    dies of it makes the main process fail with "DataLoader worker ... is killed by signal" in the middle
    of the very iteration :class:`StopRequest` wants to finish and checkpoint. Ignoring it leaves the
    workers' lifetime to the main process, which shuts them down when its loaders close (and torch's
    workers exit on their own once their parent is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingInterrupted(RuntimeError):
    """Raised by the trainer after it saved its state on a stop request; ``--resume`` continues from there."""


class StopRequest:
    """Context manager turning SIGTERM into a flag that the trainer polls at iteration boundaries.

    With ``world`` > 1 processes every rank has to stop at the same iteration (collectives follow), so
    :meth:`requested` takes the maximum of the ranks' flags over a gloo group: a CPU exchange, no GPU
    synchronisation. Outside the main thread (no signal handler can be installed there) only
    :meth:`request` sets the flag. The previous SIGTERM handler is restored on exit.
    """

    def __init__(self, world: int = 1):
        self.world = int(world)
        self._flag = False
        self._group = None
        self._installed = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        if self.world > 1:
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return False

    def _on_signal(self, signum, frame) -> None:
        self.request()

    def request(self) -> None:
        """Ask for a stop as SIGTERM does (for callers without signals, e.g. a notebook button)."""
        self._flag = True

    def requested(self) -> bool:
        """Whether any rank was asked to stop. A collective when ``world`` > 1: every rank must call it at
        the same points."""
        if self.world <= 1:
            return self._flag
        flag = torch.tensor([int(self._flag)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
