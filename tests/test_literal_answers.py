"""Rewards that cannot be earned by restating the problem: `reward.require_literal`, the restatement count
and the console warnings that watch for the hack.

math-verify evaluates expressions, so without the setting `\\boxed{24 \\times 18}` scores for 432: that is
how SmolLM2 "learned" arithmetic (answers such as `79 * 51 = \\boxed{79 * 51}`). The table grades each
answer twice through the real verifier (math-verify in its worker pool): with the setting off, as
math-verify alone does, and on.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from popo_megatron.config import load_config
from popo_megatron.data.datasets import literal_answers_by_default
from popo_megatron.reward.literal import MAX_DIGITS, literal_verdict, parse_literal
from popo_megatron.reward.math_verifier import MathGradeSettings, MathVerifier
from popo_megatron.reward.restated import restates_problem
from popo_megatron.trainer.watch import HELDOUT_EVALS, HELDOUT_MARGIN, RESTATED_MIN_CORRECT, RunWatch

# (response, gold, reason with the setting off (None: math-verify's call, not asserted), reason with it on)
HACKS = [
    # The answers the restating policy gave, and their kind: correct for math-verify, not literals.
    (r"\boxed{24 \times 18}", "432", "correct", "not_literal"),
    (r"\boxed{31 + 88}", "119", "correct", "not_literal"),
    (r"79 * 51 = \boxed{79 * 51}", "4029", "correct", "not_literal"),
    (r"\boxed{\frac{864}{2}}", "432", "correct", "not_literal"),
    (r"\boxed{2^{10}}", "1024", "correct", "not_literal"),
    (r"\boxed{(60 - 18)}", "42", "correct", "not_literal"),
    (r"\boxed{432 \cdot 1}", "432", "correct", "not_literal"),
    (r"\boxed{4.32e2}", "432", None, "not_literal"),
    (r"\boxed{432 apples}", "432", None, "not_literal"),
    # Literals: a stated value, however it is written.
    (r"\boxed{432}", "432", "correct", "correct"),
    (r"\boxed{432.0}", "432", "correct", "correct"),
    (r"\boxed{ 432 }", "432", "correct", "correct"),
    (r"\boxed{$432$}", "432", None, "correct"),
    (r"\boxed{1,234}", "1234", "correct", "correct"),
    (r"\boxed{1{,}234}", "1234", None, "correct"),
    (r"\boxed{-17}", "-17", "correct", "correct"),
    (r"\boxed{+5}", "5", None, "correct"),
    (r"\boxed{007}", "7", "correct", "correct"),
    (r"\boxed{433}", "432", "mismatch", "mismatch"),
    (r"\boxed{17}", "-17", "mismatch", "mismatch"),
    (r"\boxed{12,34}", "1234", None, "not_literal"),  # not groups of three: not a thousands separator
    # Fractions: literals only where the gold is a fraction, and in lowest terms.
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}", "correct", "correct"),
    (r"\boxed{3/4}", r"\frac{3}{4}", "correct", "correct"),
    (r"\boxed{-\dfrac{3}{4}}", r"-\frac{3}{4}", "correct", "correct"),
    (r"\boxed{0.75}", r"\frac{3}{4}", "correct", "correct"),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", "correct", "not_literal"),
    (r"\boxed{3/4}", "0.75", "correct", "not_literal"),
    (r"\boxed{\frac{1}{3}}", r"\frac{2}{3}", "mismatch", "mismatch"),
    # Fallbacks: a bare final number is a literal (the SmolLM2 example reads the last number).
    ("24 * 18 = 432", "432", "correct", "correct"),
    # A gold that is not a literal number: math-verify's symbolic equivalence either way.
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", "correct", "correct"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", "correct", "correct"),
    (r"\boxed{[0,1)}", "[0,1)", "correct", "correct"),
    ("no answer here", "432", "no_answer", "no_answer"),
]


@pytest.fixture(scope="module")
def verifiers():
    made = {}
    for literal in (False, True):
        cfg = load_config(
            overrides=["model.hf_path=/x", f"reward.require_literal={str(literal).lower()}", "reward.workers=1"]
            + ["reward.answer_fallbacks=[last_number]"]
        )
        made[literal] = MathVerifier(cfg.reward)
    yield made
    for verifier in made.values():
        verifier.close()


@pytest.mark.parametrize("literal", [False, True], ids=["math-verify", "require_literal"])
def test_hacked_answers_score_only_without_the_setting(verifiers, literal):
    grades = verifiers[literal].grade([h[0] for h in HACKS], [h[1] for h in HACKS])
    for (response, gold, off, on), grade in zip(HACKS, grades, strict=True):
        expected = on if literal else off
        where = f"{response!r} for {gold!r}: {grade}"
        if expected is not None:
            assert grade.reason == expected, where
        assert grade.score == float(grade.reason == "correct"), where
        if literal and on == "not_literal":
            assert grade.answer, "the extracted answer is kept for the records"


def test_the_setting_follows_the_training_data_unless_set():
    def settings(*overrides: str) -> bool:
        cfg = load_config(overrides=["model.hf_path=/x", *overrides])
        return MathGradeSettings.from_config(cfg.reward, literal_answers_by_default(cfg.data)).require_literal

    assert settings("data.train=synthetic")
    assert settings("data.train=arithmetic_words:train")
    assert not settings("data.train=math_train_slice"), "math benchmarks keep symbolic equivalence"
    assert not settings("data.train=arithmetic_words:train", "reward.require_literal=false"), "an explicit choice wins"
    assert settings("data.train=math_train_slice", "reward.require_literal=true")


def test_literal_values_and_bounds():
    assert parse_literal("1,234,567.50").value == Fraction(123456750, 100)
    assert parse_literal(r"-\tfrac{2}{3}").value == Fraction(-2, 3)
    assert not parse_literal("6/8").lowest_terms and parse_literal("3/4").lowest_terms
    for text in ("", "-", "1.", ".5", "1/0", "1e3", "12%", r"\text{12}", "1 2", "--1", "1,23"):
        assert parse_literal(text) is None, text
    huge = "7" * (MAX_DIGITS + 1)
    assert parse_literal(huge).value is None
    assert literal_verdict(huge, huge) == "mismatch", "too long to compare: never equal"
    million = "9" * 1_000_000  # linear: a megabyte of digits is one scan, not a huge integer
    assert literal_verdict(million, "9") == "mismatch"
    assert literal_verdict("3", r"\sqrt{9}") is None, "a gold that is not a literal leaves grading to math-verify"


@pytest.mark.parametrize(
    "answer, problem, restated",
    [
        ("79 * 51", "What is 79 * 51?", True),
        (r"24 \times 18", "Ava buys 24 packs of cards with 18 in each pack. How many cards is that?", True),
        ("31 + 88", "What is the sum of 31 and 88?", True),
        (r"\frac{864}{2}", "What is 864 / 2?", True),
        ("4029", "What is 79 * 51?", False),  # the result, not a restatement
        ("79 51", "What is 79 * 51?", False),  # no operator
        ("79 * 3", "What is 79 * 51?", False),  # one of the problem's numbers
        ("7 + 7", "What is 7 * 2?", False),  # 7 occurs once in the problem
        (None, "What is 1 + 2?", False),
    ],
)
def test_restatements_are_recognised(answer, problem, restated):
    assert restates_problem(answer, problem) is restated


def _record(step: int, reward: float, correct: float = 0.0, restated: float = 0.0) -> dict:
    return {
        "step": step,
        "reward_mean": reward,
        "all": {"reward/correct": correct, "reward/restated_problem": restated},
    }


def test_the_watch_warns_once_when_most_correct_answers_restate_the_problem():
    watch = RunWatch()
    assert watch.step(_record(1, 0.2, RESTATED_MIN_CORRECT - 1, RESTATED_MIN_CORRECT - 1)) == [], "too few"
    assert watch.step(_record(2, 0.2, 20, 9)) == [], "a minority"
    [warning] = watch.step(_record(3, 0.2, 20, 10))
    assert "step 3" in warning and "10 of the 20" in warning and "reward.require_literal=true" in warning
    assert watch.step(_record(4, 0.2, 20, 20)) == [], "once per run"


def test_the_watch_warns_once_when_the_entropy_falls_below_the_floor():
    quiet = RunWatch()  # no floor: never
    assert quiet.step({**_record(1, 0.5), "entropy": 0.01}) == []
    watch = RunWatch(entropy_floor=0.5)
    assert watch.step({**_record(1, 0.5), "entropy": float("nan")}) == [], "a step without an update"
    assert watch.step({**_record(2, 0.5), "entropy": 0.6}) == []
    [warning] = watch.step({**_record(3, 0.5), "entropy": 0.4})
    assert "step 3" in warning and "0.400 is below 0.5" in warning and "popo.beta_ent" in warning
    assert watch.step({**_record(4, 0.5), "entropy": 0.3}) == [], "once per run"


def test_the_watch_warns_when_held_out_beats_training_for_several_evaluations():
    watch = RunWatch()
    assert watch.heldout(0, 0.9) is None, "the start has no train reward to compare with"
    warnings = []
    for evaluation in range(HELDOUT_EVALS + 1):
        for step in range(5):
            watch.step(_record(10 * evaluation + step, 0.5))
        warnings.append(watch.heldout(10 * evaluation + 5, 0.5 + HELDOUT_MARGIN + 0.01))
    assert warnings[: HELDOUT_EVALS - 1] == [None] * (HELDOUT_EVALS - 1), "one evaluation is not a pattern"
    assert "held-out accuracy 0.660 is above the train reward (0.500" in warnings[HELDOUT_EVALS - 1]
    assert warnings[HELDOUT_EVALS] is None, "once per run"

    steady = RunWatch()  # held-out within the margin, or above it only now and then: quiet
    for evaluation, gap in enumerate([HELDOUT_MARGIN + 0.05, 0.0, HELDOUT_MARGIN + 0.05, HELDOUT_MARGIN - 0.01]):
        steady.step(_record(evaluation, 0.5))
        assert steady.heldout(evaluation + 1, 0.5 + gap) is None


@pytest.mark.parametrize("reason", ["bad_gold", "parse_failure"])
def test_the_watch_warns_once_when_the_grader_cannot_read_most_of_a_step(reason):
    watch = RunWatch()
    half = {"reward/correct": 5, "reward/mismatch": 5, f"reward/{reason}": 10}
    assert watch.step({**_record(1, 0.2), "all": half}) == [], "half is not most"
    [warning] = watch.step({**_record(2, 0.2), "all": {**half, f"reward/{reason}": 11}})
    assert f"step 2: 11 of 21 grades are {reason}" in warning
    assert watch.step({**_record(3, 0.2), "all": {f"reward/{reason}": 30}}) == [], "once per run"
