"""Rewards: answer extraction, math-verify grading (a table of cases with expected scores), and the grading pool
(hard timeouts, crashed workers replaced, results in input order, bugs raised)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from grading_helpers import (
    allocating_grade,
    crashing_grade,
    exit_with_an_open_pool,
    hanging_warm_up,
    module_loaded,
    raising_grade,
    sleepy_grade,
    slow_warm_up,
)

from popo_megatron.config import load_config
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.reward.extract import extract_answer, last_boxed
from popo_megatron.reward.grade import add_grade_metrics
from popo_megatron.reward.math_verifier import MathVerifier, warm_up_math_verify
from popo_megatron.reward.pool import GradingPool

# Long enough for the slowest honest comparison here ((x+1)^2 against its expansion) on a loaded 2-core
# machine (2 s timed out next to another pytest worker); the adversarial rows each cost about this much.
TIMEOUT_S = 5.0
MILLION_DIGITS = r"\boxed{" + "7" * 1_000_000 + "}"
NESTED_BRACES = r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
POWER_TOWER = r"\boxed{9^{9^{9^{9^{9}}}}}"

# (response, gold, expected score, expected reason or None when several are right); fallbacks off.
CASES = [
    # Equivalent forms of the right answer.
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1, "correct"),
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1, "correct"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1, "correct"),
    (r"The answer is $\boxed{2\sqrt{2}}$.", r"\sqrt{8}", 1, "correct"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1, "correct"),
    (r"\boxed{\pi}", r"\pi", 1, "correct"),
    (r"\boxed{3.0}", "3", 1, "correct"),
    (r"\boxed{ 7 }", "7", 1, "correct"),
    (r"\boxed{(1,2)}", "(1, 2)", 1, "correct"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1, "correct"),
    (r"\boxed{-\frac{3}{4}}", "-0.75", 1, "correct"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}", 1, "correct"),
    (r"\fbox{12}", "12", 1, "correct"),
    (r"thus \boxed 5", "5", 1, "correct"),
    (r"\boxed{2^{10}}", "1024", 1, "correct"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1, "correct"),
    (r"\boxed{[0,1)}", "[0,1)", 1, "correct"),
    (r"\boxed{\infty}", r"\infty", 1, "correct"),
    # Wrong answers.
    (r"\boxed{3}", "4", 0, "mismatch"),
    (r"\boxed{\frac{1}{3}}", "0.33", 0, "mismatch"),
    (r"\boxed{x+1}", "x-1", 0, "mismatch"),
    (r"\boxed{[0,1]}", "[0,1)", 0, "mismatch"),
    # Several boxed answers: the last one counts.
    (r"first \boxed{4}, then \boxed{5}", "5", 1, "correct"),
    (r"first \boxed{5}, then \boxed{4}", "5", 0, "mismatch"),
    (r"\boxed{5} and an unclosed \boxed{4", "5", 1, "correct"),
    # No answer.
    ("I do not know.", "5", 0, "no_answer"),
    ("the answer is 5", "5", 0, "no_answer"),  # fallbacks are off
    ("", "5", 0, "no_answer"),
    (r"\boxed{}", "5", 0, "no_answer"),
    # Malformed LaTeX.
    (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", 0, "no_answer"),
    (r"\boxed{\sqrt{}}", "1", 0, None),
    (r"\boxed{)(}", "1", 0, None),
    # A broken reference answer is the dataset's problem, and says so.
    (r"\boxed{3}", "", 0, "bad_gold"),
    # Adversarial outputs: each costs at most its timeout.
    (MILLION_DIGITS, "7", 0, None),
    (NESTED_BRACES, "1", 0, None),
    (POWER_TOWER, "1", 0, None),
    (r"\boxed{" * 200_000, "1", 0, "no_answer"),
]


@pytest.fixture(scope="module")
def verifier():
    cfg = load_config(overrides=["model.hf_path=/x", f"reward.timeout_s={TIMEOUT_S}", "reward.workers=2"])
    verifier = MathVerifier(cfg.reward)
    yield verifier
    verifier.close()


def test_grade_table(verifier):
    assert len(CASES) >= 30
    grades = verifier.grade([c[0] for c in CASES], [c[1] for c in CASES])
    for (response, gold, score, reason), grade in zip(CASES, grades, strict=True):
        where = f"{response[:40]!r} vs {gold!r}: {grade}"
        assert grade.score == score, where
        if reason is not None:
            assert grade.reason == reason, where
    reasons = verifier.pool.stats.reasons
    assert reasons["timeout"] >= 1, "the power tower must end by timeout"
    metrics = MetricAccumulator()
    add_grade_metrics(grades, metrics)
    reported = metrics.reduce()
    assert reported["reward/mean"] == pytest.approx(sum(c[2] for c in CASES) / len(CASES))
    assert reported["reward/timeout"] == sum(g.reason == "timeout" for g in grades) >= 1


def test_fallbacks_find_answers_without_a_box():
    assert extract_answer("so we get 42", ["last_number"]).answer == "42"
    assert extract_answer("3/4 of them, i.e. -1.5 left", ["last_number"]).answer == "-1.5"
    assert extract_answer("The answer is $x+1$. Done", ["answer_is"]).answer == "x+1"
    assert extract_answer(r"we get \(\frac{1}{2}\) here", ["last_math"]).answer == r"\frac{1}{2}"
    assert extract_answer("the answer is 5", ["last_math", "last_number"]).source == "last_number"
    assert extract_answer(r"\boxed{1} and 7", ["last_number"]).source == "boxed", "a box comes first"
    assert extract_answer("no digits", ["last_number"]) is None
    assert last_boxed(r"\boxed{a{b}c}") == "a{b}c"
    # only_number: the whole response is the number, or there is no answer (filler around it scores nothing)
    assert extract_answer(" 17\n", ["only_number"]).answer == "17"
    assert extract_answer("-3/4", ["only_number"]).answer == "-3/4"
    for text in ("17-", "1+7", "x 17", "17 17", ""):
        assert extract_answer(text, ["only_number"]) is None, text


def test_fallbacks_reach_the_verifier():
    cfg = load_config(overrides=["model.hf_path=/x", "reward.workers=1", "reward.answer_fallbacks=[last_number]"])
    verifier = MathVerifier(cfg.reward)
    try:
        grades = verifier.grade(["3 + 4 = 7", "3 + 4 = 8", "seven"], ["7", "7", "7"])
        # Integers are compared by value without sympy: the same verdicts math-verify gives.
        integers = verifier.grade(["= 07", "= -12", "= 12", "= 100000000000000000001"], ["7", "-12", "-12", "1e20"])
    finally:
        verifier.close()
    assert [g.reason for g in grades] == ["correct", "mismatch", "no_answer"]
    assert [g.reason for g in integers] == ["correct", "correct", "mismatch", "mismatch"]


def test_pool_kills_overrunning_workers_and_keeps_order():
    with GradingPool(sleepy_grade, None, workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        grades = pool.map([("a", 0.0), ("stuck", 60.0), ("b", 0.1), ("also stuck", 60.0), ("c", 0.0)])
        elapsed = time.monotonic() - start
        assert [g.reason for g in grades] == ["correct", "timeout", "correct", "timeout", "correct"]
        assert [g.answer for g in grades if g.correct] == ["a", "b", "c"], "results come back in input order"
        assert pool.stats.timeouts == 2 and pool.stats.restarts == 2
        # Not a speed bound: a batch that waited for a stuck sample would take its whole 60 s.
        assert elapsed < 60, f"two stuck samples held the batch for {elapsed:.1f}s"
        assert [g.reason for g in pool.map([("again", 0.0)])] == ["correct"], "replacements work"


def test_pool_replaces_crashed_workers():
    with GradingPool(crashing_grade, None, workers=2, timeout_s=5.0) as pool:
        grades = pool.map([("x",), ("crash",), ("y",), ("crash",), ("z",)])
        assert [g.reason for g in grades] == ["correct", "worker_crash", "correct", "worker_crash", "correct"]
        assert pool.stats.crashes == 2


def test_a_bug_in_the_grader_is_raised_not_hidden():
    with GradingPool(raising_grade, None, workers=1, timeout_s=5.0) as pool:
        with pytest.raises(RuntimeError, match="ZeroDivisionError: bug in the grader on 'boom'"):
            pool.map([("boom",)])


def test_workers_warm_up_before_their_first_deadline():
    # A warm-up longer than the timeout: the first samples are graded, not scored as timeouts.
    with GradingPool(sleepy_grade, None, workers=2, timeout_s=1.0, warm_up=slow_warm_up) as pool:
        assert [g.reason for g in pool.map([("a", 0.0), ("b", 0.0), ("c", 0.0)])] == ["correct"] * 3
        assert pool.stats.timeouts == 0
    # The verifier's workers have math-verify and sympy imported before they take a sample.
    with GradingPool(module_loaded, None, workers=1, timeout_s=5.0, warm_up=warm_up_math_verify) as pool:
        assert [g.score for g in pool.map([("math_verify",), ("sympy",)])] == [1.0, 1.0]


def test_a_process_that_exits_without_closing_its_pool_ends_and_so_do_its_graders(tmp_path):
    """Graders ignore SIGTERM, which is how multiprocessing stops daemonic children at exit before waiting
    for them: the pool stops them first, or a rank whose set-up failed would hang instead of exiting."""
    import multiprocessing as mp

    import psutil

    process = mp.get_context("spawn").Process(target=exit_with_an_open_pool, args=(str(tmp_path / "pid"),))
    process.start()
    process.join(timeout=60)
    if process.exitcode is None:
        process.kill()
    assert process.exitcode == 3, "the process hung at exit"
    grader = int((tmp_path / "pid").read_text())
    assert not psutil.pid_exists(grader) or psutil.Process(grader).status() == psutil.STATUS_ZOMBIE


def test_a_script_read_from_stdin_is_told_why_workers_cannot_start():
    script = (
        "from popo_megatron.reward.math_verifier import grade_math, MathGradeSettings\n"
        "from popo_megatron.reward.pool import GradingPool\n"
        "with GradingPool(grade_math, MathGradeSettings((), 5.0), workers=1, timeout_s=5.0) as pool:\n"
        "    pool.map([('1', '1')])\n"
    )
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "read from standard input" in proc.stderr, proc.stderr[-2000:]


def test_mismatched_inputs_are_refused(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        verifier.grade(["a", "b"], ["1"])


def test_last_math_is_the_regex_alternation_in_one_pass():
    import random
    import re

    from popo_megatron.reward.extract import _last_math

    regex = re.compile(r"\$([^$]+)\$|\\\((.+?)\\\)", re.DOTALL)  # what it replaces: quadratic

    def reference(text):
        matches = regex.findall(text)
        return next((m for m in reversed(matches[-1]) if m), None) if matches else None

    rng = random.Random(0)
    pieces = ["$", "$$", "\\(", "\\)", "\\", "(", ")", "x", "1", " ", "\n"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert _last_math(text) == reference(text), repr(text)
    # Many openings without a close: one pass (the regex takes minutes here), and the right answer.
    assert _last_math("\\(" * 200_000) is None
    assert _last_math("\\(" * 200_000 + "y\\)") == "\\(" * 199_999 + "y"
    assert _last_math("$" + "a$" * 100_000) == "a"


def test_a_worker_stuck_while_starting_is_replaced_then_the_batch_fails(monkeypatch):
    from popo_megatron.reward import pool as pool_module

    monkeypatch.setattr(pool_module, "STARTUP_S", 1.0)
    with GradingPool(sleepy_grade, None, workers=1, timeout_s=1.0, warm_up=hanging_warm_up) as pool:
        with pytest.raises(RuntimeError, match="did not get ready within 1 s of their start, 3 times"):
            pool.map([("a", 0.0)])
        assert pool.stats.start_timeouts == 2


def test_a_worker_over_its_memory_limit_is_a_crash_not_the_machines():
    with GradingPool(allocating_grade, None, workers=1, timeout_s=30.0, memory_limit_bytes=1024 * 2**20) as pool:
        grades = pool.map([("a",), ("hog",), ("b",)])
        assert [g.reason for g in grades] == ["correct", "worker_crash", "correct"]


def test_a_changed_math_verify_is_raised_not_graded_zero(monkeypatch):
    import math_verify

    from popo_megatron.reward.math_verifier import MathGradeSettings, grade_math

    settings = MathGradeSettings((), TIMEOUT_S)

    def renamed(*args, **kwargs):
        raise AttributeError("module 'math_verify' has no attribute 'parse_latex'")

    monkeypatch.setattr(math_verify, "parse", renamed)
    with pytest.raises(AttributeError, match="parse_latex"):
        grade_math(r"\boxed{x+1}", "1+x", settings)
    monkeypatch.undo()
    monkeypatch.setattr(math_verify, "verify", lambda *args, **kwargs: False)  # a changed behaviour
    with pytest.raises(RuntimeError, match="does not behave as popo_megatron.reward.math_verifier expects"):
        warm_up_math_verify()
