"""Grade one response against a gold answer with math-verify: score 1 or 0, and why.

The answer is extracted by popo_megatron.reward.extract (last \\boxed{} first,
then the configured fallbacks); both it and the gold answer are wrapped in
\\boxed{} so that math-verify parses bare LaTeX (it returns nothing for LaTeX
without delimiters), and compared gold first (`verify` is not symmetric).

math-verify bounds its own parsing and comparison with SIGALRM timeouts,
which only work in a process's main thread: grading runs in worker processes
(popo_megatron.reward.pool), which also kill a worker that overruns. The
three calls of one sample share one deadline, reward.timeout_s from the
sample's start, the parent's own deadline (plus its grace): a sample never
outlives the parent's patience because it was timed three times.

Malformed LaTeX makes math-verify and sympy raise many kinds of errors, all
graded `parse_failure`; the errors that mean our use of the library is broken
(a renamed function or argument) are raised, and the warm-up of every worker
checks the calls this module makes on known answers before it grades.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from popo_megatron.reward.extract import extract_answer
from popo_megatron.reward.grade import Grade
from popo_megatron.reward.literal import literal_verdict
from popo_megatron.reward.pool import GradingPool

# Grades keep at most this much of the extracted answer (an adversarial one can be megabytes).
ANSWER_CHARS = 200
# Errors that mean the library is not used as it expects (a renamed function or argument), not bad input.
API_BREAKS = (ImportError, AttributeError, NameError)
# What every grading worker checks before it grades: each through math-verify (none is literal-only).
WARM_UP_CASES = (
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{2}", "mismatch"),
)


@dataclass(frozen=True)
class MathGradeSettings:
    fallbacks: tuple[str, ...]  # reward.answer_fallbacks
    timeout_s: float  # math-verify's own limit on each parse and on the comparison (reward.timeout_s)
    require_literal: bool = False  # reward.require_literal: a literal gold accepts literal answers only

    @classmethod
    def from_config(cls, reward_cfg: DictConfig, literal_default: bool = False) -> MathGradeSettings:
        """The `reward` section's settings; `literal_default`: require literal answers when
        reward.require_literal is unset (the training data's choice: data.datasets.literal_answers_by_default)."""
        literal = reward_cfg.require_literal
        return cls(
            tuple(reward_cfg.answer_fallbacks), reward_cfg.timeout_s, literal_default if literal is None else literal
        )


_INTEGER = re.compile(r"-?\d{1,100}")  # bounded: int() of a megabyte of digits is slow


def _boxed(text: str) -> str:
    return "\\boxed{" + text + "}"


def grade_without_sympy(response: str, gold: str, settings: MathGradeSettings) -> Grade | None:
    """The grade when no parsing is needed (no answer, identical strings, two integers, a literal gold under
    `require_literal`), else None.

    Bounded work on any input (extraction is one linear scan, integers are at most 100 digits), so the
    caller may run it in-process: only the answers that need math-verify go to the worker processes."""
    extracted = extract_answer(response, settings.fallbacks)
    if extracted is None:
        return Grade(0.0, "no_answer")
    answer = extracted.answer
    shown = answer[:ANSWER_CHARS]
    if settings.require_literal:
        verdict = literal_verdict(answer, gold)
        if verdict is not None:
            return Grade(float(verdict == "correct"), verdict, shown)
    if answer == gold.strip():
        return Grade(1.0, "correct", shown)
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold.strip()):  # two integers: compare their values
        return Grade(1.0, "correct", shown) if int(answer) == int(gold) else Grade(0.0, "mismatch", shown)
    return None


def grade_math(response: str, gold: str, settings: MathGradeSettings) -> Grade:
    """Score `response` against `gold` (a LaTeX answer, e.g. "\\frac{1}{2}")."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    quick = grade_without_sympy(response, gold, settings)
    if quick is not None:
        return quick
    answer = extract_answer(response, settings.fallbacks).answer
    shown = answer[:ANSWER_CHARS]
    deadline = time.monotonic() + settings.timeout_s

    def seconds_left() -> int:  # math-verify's alarm counts whole seconds
        left = int(deadline - time.monotonic())
        if left < 1:
            raise TimeoutException("the sample's deadline passed")
        return left

    try:
        gold_parsed = parse(_boxed(gold), parsing_timeout=seconds_left(), raise_on_error=True)
        if not gold_parsed:
            return Grade(0.0, "bad_gold", shown)
        predicted = parse(_boxed(answer), parsing_timeout=seconds_left(), raise_on_error=True)
        if not predicted:
            return Grade(0.0, "parse_failure", shown)
        same = verify(gold_parsed, predicted, timeout_seconds=seconds_left(), raise_on_error=True)
    except TimeoutException:
        return Grade(0.0, "timeout", shown)
    except API_BREAKS:
        raise
    except Exception:  # sympy / antlr / lark errors on malformed LaTeX, oversized integers, ...
        return Grade(0.0, "parse_failure", shown)
    return Grade(1.0, "correct", shown) if same else Grade(0.0, "mismatch", shown)


def warm_up_math_verify() -> None:
    """Import math-verify and sympy and grade known answers with the calls grade_math makes: seconds of
    first-use cost on a loaded machine, paid before a grading worker reports ready instead of inside a
    sample's deadline, and a check that the library still answers as this module expects (a changed API or
    behaviour stops the worker's start with the reason, instead of grading every answer 0)."""
    settings = MathGradeSettings((), 30.0)
    for response, gold, reason in WARM_UP_CASES:
        got = grade_math(response, gold, settings).reason
        if got != reason:
            raise RuntimeError(
                f"math-verify graded {response!r} against {gold!r} as {got!r}, not {reason!r}: this version of"
                " math-verify does not behave as popo_megatron.reward.math_verifier expects"
            )


class MathVerifier:
    """The `reward` config's verifier: grade_math in a GradingPool of `reward.workers` processes
    (`literal_default`: see MathGradeSettings.from_config)."""

    def __init__(self, reward_cfg: DictConfig, literal_default: bool = False, progress: bool = False) -> None:
        settings = MathGradeSettings.from_config(reward_cfg, literal_default)
        self.settings = settings
        self.pool = GradingPool(
            grade_math,
            settings,
            reward_cfg.workers,
            reward_cfg.timeout_s,
            progress,
            warm_up=warm_up_math_verify,
            memory_limit_bytes=reward_cfg.worker_memory_mb * 2**20,
        )

    def grade(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]:
        """One grade per response, in order; `golds[i]` is the reference answer of `responses[i]`."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        grades = [grade_without_sympy(r, g, self.settings) for r, g in zip(responses, golds, strict=True)]
        # The pool's round trip per sample (~0.1 ms) is most of the cost when answers are plain integers.
        parsing = [i for i, grade in enumerate(grades) if grade is None]
        for i, grade in zip(parsing, self.pool.map([(responses[i], golds[i]) for i in parsing]), strict=True):
            grades[i] = grade
        return grades

    def close(self) -> None:
        self.pool.close()
