"""Grading functions with failure modes, for the pool tests (module-level: worker processes import them)."""

from __future__ import annotations

import os
import time

from popo_megatron.reward.grade import Grade


def sleepy_grade(text: str, seconds: float, settings) -> Grade:
    """Score 1 after sleeping `seconds` (ignores any cooperative timeout, like a stuck native call)."""
    time.sleep(seconds)
    return Grade(1.0, "correct", text)


def crashing_grade(text: str, settings) -> Grade:
    if text == "crash":
        os._exit(17)  # a segfault or an OOM kill, as far as the parent can tell
    return Grade(1.0, "correct", text)


def raising_grade(text: str, settings) -> Grade:
    raise ZeroDivisionError(f"bug in the grader on {text!r}")


def gold_parses(gold: str, settings) -> Grade:
    """Whether math-verify extracts something from a gold answer (wrapped as the verifier wraps it)."""
    from math_verify import parse

    parsed = parse("\\boxed{" + gold + "}", parsing_timeout=5)
    return Grade(1.0, "correct", gold) if parsed else Grade(0.0, "bad_gold", gold)


def slow_warm_up() -> None:
    """A warm-up longer than the pools' timeouts in the tests (imports on a loaded machine)."""
    time.sleep(2.5)


def module_loaded(name: str, settings) -> Grade:
    """Score 1 if module `name` was imported in this worker before it graded anything."""
    import sys

    return Grade(1.0 if name in sys.modules else 0.0, "correct" if name in sys.modules else "mismatch", name)


def hanging_warm_up() -> None:
    """A start that never ends (an import stuck on a file system)."""
    time.sleep(3600)


def allocating_grade(text: str, settings) -> Grade:
    """Allocate without bound on "hog" (sympy expanding an adversarial expression, as far as memory goes)."""
    if text == "hog":
        blocks = []
        while True:
            blocks.append(bytearray(64 * 2**20))
    return Grade(1.0, "correct", text)


def grader_pid(settings) -> Grade:
    return Grade(1.0, "correct", str(os.getpid()))


def exit_with_an_open_pool(pid_file: str) -> None:
    """A process (a rank of `popo train`, started by multiprocessing) whose set-up fails after its grading
    pool started: it exits without closing the pool. Writes its grader's PID to `pid_file`."""
    from pathlib import Path

    from popo_megatron.reward.pool import GradingPool

    pool = GradingPool(grader_pid, None, workers=1, timeout_s=5.0)
    Path(pid_file).write_text(pool.map([()])[0].answer)
    raise SystemExit(3)
