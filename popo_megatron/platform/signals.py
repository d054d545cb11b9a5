"""Stop signals and the helper processes a rank starts.

A stop signal reaches every process of a job step, not only the ranks: Slurm delivers SIGTERM (preemption,
scancel) and the `--signal` warning (SIGUSR1) to all processes of the step, and Ctrl-C sends SIGINT to the
whole foreground process group. The ranks stop cleanly on SIGTERM and SIGUSR1 (finish the step, write a
checkpoint, exit; see trainer/loop.py); SIGINT interrupts them at once, as Ctrl-C should. A helper process
a rank started must survive all three, or the checkpoint a signal asks for fails: megatron-core's
checkpoint writer talks to a `multiprocessing.Manager` process it spawns on the first save, and a grading
worker that dies mid-step costs a sample.

"spawn" children reset handled signals to their default (which for these three is: die), but keep the
blocked signal mask across fork and exec. So a helper started inside `stop_signals_held` is born with the
stop signals blocked, and one running our code then ignores them for good (`ignore_stop_signals`). The
rank itself loses nothing: its other threads still take the signal for its handlers, and what arrives for
the blocking thread is delivered when the block ends.

One trap: the first "spawn" start of a process also starts multiprocessing's resource tracker, and that
*unblocks* SIGINT and SIGTERM in the calling thread afterwards (bpo-33613), so every later start in the
block would be born without them held. The block therefore starts the tracker itself, then blocks again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the stop signals in this thread for the block; processes started in it never see them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()  # a no-op once running; see the module docstring
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """In a helper process: the parent decides when to stop, whatever signal reached this process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
