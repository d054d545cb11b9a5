"""Stop signals reach every process of a job step (Slurm, Ctrl-C); helper processes must survive them.

- A "spawn" child started inside `stop_signals_held` survives SIGUSR1 and SIGTERM; one started outside
  dies of them (what happened to megatron-core's checkpoint-writer process before).
- The rank's own handler still gets a signal sent while it was held.
- Grading workers survive the stop signals and keep grading.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

from grading_helpers import sleepy_grade

from popo_megatron.platform.signals import stop_signals_held
from popo_megatron.reward.pool import GradingPool


def _report_then_answer(conn) -> None:
    conn.send("ready")
    while conn.poll(60):  # answers every ping, until the test closes the pipe or a minute passes
        conn.send(conn.recv())


def _start_helper(held: bool):
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_report_then_answer, args=(child,), daemon=True)
    if held:
        with stop_signals_held():
            process.start()
    else:
        process.start()
    assert parent.poll(60) and parent.recv() == "ready"
    return process, parent


def test_helpers_started_while_held_survive_stop_signals_and_others_do_not():
    (held, held_conn), (bare, _) = _start_helper(held=True), _start_helper(held=False)
    try:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(held.pid, sig)
        os.kill(bare.pid, signal.SIGUSR1)
        bare.join(60)
        assert bare.exitcode == -signal.SIGUSR1, "a helper started outside the block dies of SIGUSR1"
        # A reply to a ping sent after the signals: alive after them, however loaded the machine (the helper
        # was born with them blocked, so they stay pending; a helper of ours then ignores them for good).
        held_conn.send("ping")
        assert held_conn.poll(60) and held_conn.recv() == "ping", "a helper started inside the block survives"
        assert held.is_alive()
    finally:
        for process in (held, bare):
            process.kill()
            process.join()


def test_the_ranks_own_handler_still_gets_a_held_signal():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_held():
            os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_grading_workers_survive_stop_signals():
    with GradingPool(sleepy_grade, None, workers=2, timeout_s=5.0) as pool:
        pool.map([("a", 0.0), ("b", 0.0)])  # the workers are up
        for worker in pool._workers:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                os.kill(worker.process.pid, sig)
        grades = pool.map([("c", 0.2), ("d", 0.2)])
        assert [g.score for g in grades] == [1.0, 1.0]
        assert pool.stats.restarts == 0 and pool.stats.crashes == 0


def test_the_stop_margin_includes_the_save_and_checkpoints_come_due_by_time():
    from popo_megatron.trainer.loop import StopRequest

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequest(max_wall_time_s=100.0, checkpoint_every_minutes=None)
        stop.start -= 50  # 50 s into the job
        assert stop.agreed(step_s=10.0, save_s=20.0) == (None, False)  # 50 + 2 x 10 + 20 <= 100
        assert stop.agreed(step_s=10.0, save_s=45.0) == ("time", False), "a slow save no longer fits"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed(step_s=0.0, save_s=0.0) == ("signal", False)

        timed = StopRequest(max_wall_time_s=None, checkpoint_every_minutes=0.5)
        assert timed.agreed(step_s=1.0, save_s=1.0) == (None, False)
        timed.last_save -= 31
        assert timed.agreed(step_s=1.0, save_s=1.0) == (None, True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
