"""Grade in worker processes with a hard deadline per sample; results in input order.

A model output can make a verifier hang (a power tower, a million digits,
thousands of nested braces). Each worker grades one sample at a time; the
parent waits on all of them at once and, when a sample overruns its timeout,
kills that worker, records the sample as "timeout" and starts a replacement.
A worker that dies (a segfault in a native library, an OOM kill, its memory
limit) is replaced the same way and its sample recorded as "worker_crash". A
worker that is not ready STARTUP_S after its start is replaced too (a stuck
import on a shared file system), and the batch fails after MAX_START_FAILURES
of them. So a batch always returns, every sample costs at most its timeout
(plus the grace below), and a bug in the grading code itself (an exception)
is raised, not hidden as a zero.

Workers are started with "spawn": the trainer's processes hold threads
(gloo, vLLM) that make fork unsafe. They ignore the stop signals (Ctrl-C and
Slurm's preemption and time-limit signals reach every process; the trainer
finishes its step, grading included, and saves a checkpoint; see
platform/signals.py): the parent decides when grading stops. `close` stops
them, and runs at exit if nobody called it; a worker whose parent is gone
exits when its pipe closes.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import resource
import sys
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from popo_megatron.logs import progress
from popo_megatron.platform.signals import ignore_stop_signals, stop_signals_held
from popo_megatron.reward.grade import Grade

# Added to the timeout before a worker is killed: process scheduling, not grading.
GRACE_S = 0.5
# A worker's start (spawn, imports, warm-up) may take this long before it is replaced, and this many such
# replacements in one batch fail it.
STARTUP_S = 180.0
MAX_START_FAILURES = 3
MEMORY_EXIT = 75  # a worker's exit status when a sample ran it out of its memory limit
_UNIMPORTABLE_MAIN = (
    "the calling script was read from standard input, and a 'spawn' worker must import the parent's main "
    "module: run the script from a file (python script.py), or from an importable module"
)


def _main_unimportable() -> bool:
    """A script piped to `python -` (spawn re-imports __main__ by its file, and '<stdin>' is none)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and not os.path.isfile(main_file)


def _worker_main(
    conn: Connection,
    grade: Callable[..., Grade],
    settings: Any,
    warm_up: Callable[[], None] | None,
    memory_limit_bytes: int | None,
) -> None:
    ignore_stop_signals()
    if memory_limit_bytes is not None:  # the heap and private mappings: sympy's, not the machine's
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit_bytes, memory_limit_bytes))
    if warm_up is not None:  # before "ready": imports must not eat into the first sample's deadline
        warm_up()
    conn.send(("ready", None, None))
    while True:
        task = conn.recv()
        if task is None:
            return
        index, args = task
        try:
            conn.send(("done", index, grade(*args, settings)))
        except MemoryError:  # over the limit: the parent sees a crashed worker and replaces it
            os._exit(MEMORY_EXIT)
        except Exception:
            conn.send(("error", index, traceback.format_exc()))


@dataclass(eq=False)
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    started: float  # time.monotonic() at its start
    ready: bool = False
    task: int | None = None  # the index being graded
    deadline: float = 0.0


@dataclass
class PoolStats:
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    start_timeouts: int = 0
    reasons: Counter = field(default_factory=Counter)


class GradingPool:
    """`workers` processes calling `grade(*item, settings)` for each item of `map`; each runs `warm_up()`
    (imports, first-use set-up) before it takes a sample."""

    def __init__(
        self,
        grade: Callable[..., Grade],
        settings: Any,
        workers: int,
        timeout_s: float,
        progress: bool = False,
        warm_up: Callable[[], None] | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a grading pool needs at least one worker, got {workers}")
        self._grade, self._settings, self._warm_up = grade, settings, warm_up
        self.memory_limit_bytes = memory_limit_bytes
        self.timeout_s = timeout_s
        self.progress = progress
        self.stats = PoolStats()
        self._context = mp.get_context("spawn")
        self._workers = [self._start() for _ in range(workers)]
        # At exit, before multiprocessing's own clean-up: that one stops daemonic children with SIGTERM,
        # which graders ignore, and then waits for them forever (a rank whose set-up failed would hang).
        # An atexit hook would not do: a multiprocessing child (a rank of `popo train`) exits without them.
        self._at_exit = mp_util.Finalize(None, self.close, exitpriority=10)

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child, self._grade, self._settings, self._warm_up, self.memory_limit_bytes),
            daemon=True,
            name="popo-grader",
        )
        with stop_signals_held():  # until the worker ignores them itself
            process.start()
        child.close()
        return _Worker(process, parent, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start()
        self.stats.restarts += 1

    def map(self, items: Sequence[tuple]) -> list[Grade]:
        """Grade every item (a tuple of `grade`'s arguments before `settings`); results in input order."""
        results: list[Grade | None] = [None] * len(items)
        pending = deque(range(len(items)))
        bar = progress(total=len(items), desc="grading", unit="sample", disable=not self.progress, leave=False)

        def finish(index: int, grade: Grade) -> None:
            results[index] = grade
            self.stats.reasons[grade.reason] += 1
            bar.update()

        start_failures = 0
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    worker.task = pending.popleft()
                    worker.deadline = time.monotonic() + self.timeout_s + GRACE_S
                    worker.conn.send((worker.task, items[worker.task]))
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            deadlines += [w.started + STARTUP_S for w in self._workers if not w.ready]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            watched = {w.conn: w for w in self._workers} | {w.process.sentinel: w for w in self._workers}
            ready = wait(list(watched), timeout=timeout)
            for worker in {watched[obj] for obj in ready}:
                try:
                    while worker.conn.poll():
                        kind, index, payload = worker.conn.recv()
                        if kind == "ready":
                            worker.ready = True
                        elif kind == "done":
                            finish(index, payload)
                            worker.task = None
                        else:
                            raise RuntimeError(f"grading {items[index]!r} raised an exception:\n{payload}")
                except (EOFError, OSError):
                    pass  # the worker died: handled below
                if not worker.process.is_alive():
                    if not worker.ready:
                        raise RuntimeError(
                            f"a grading worker exited while starting (exit code {worker.process.exitcode}); "
                            + (
                                _UNIMPORTABLE_MAIN
                                if _main_unimportable()
                                else "run the grading function in a plain process to see why"
                            )
                        )
                    if worker.task is not None:
                        finish(worker.task, Grade(0.0, "worker_crash"))
                        self.stats.crashes += 1
                    self._replace(worker)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and now > worker.deadline:
                    finish(worker.task, Grade(0.0, "timeout"))
                    self.stats.timeouts += 1
                    self._replace(worker)
                elif not worker.ready and now > worker.started + STARTUP_S:
                    start_failures += 1
                    if start_failures >= MAX_START_FAILURES:
                        raise RuntimeError(
                            f"grading workers did not get ready within {STARTUP_S:.0f} s of their start, "
                            f"{start_failures} times in this batch (spawn, imports, the warm-up): see why by "
                            "running the grading function in a plain process"
                        )
                    self.stats.start_timeouts += 1
                    self._replace(worker)
        bar.close()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []
        self._at_exit.cancel()

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
