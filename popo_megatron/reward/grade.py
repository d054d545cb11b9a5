"""A verifier's verdict on one response: its score and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from popo_megatron.metrics import GRADE_REASONS, REWARD_MEAN, REWARD_REASONS, MetricAccumulator

# Every grade carries exactly one reason (each is counted every step: popo_megatron.metrics).
REASONS = GRADE_REASONS


@dataclass(frozen=True)
class Grade:
    score: float
    reason: str
    answer: str | None = None  # what was extracted from the response

    @property
    def correct(self) -> bool:
        return self.reason == "correct"


class Verifier(Protocol):
    """Grades responses against reference answers (popo_megatron.reward.math_verifier.MathVerifier)."""

    def grade(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]:
        """One grade per response, in input order."""

    def close(self) -> None:
        """Stop the verifier's workers."""


def add_grade_metrics(grades: Sequence[Grade], metrics: MetricAccumulator) -> None:
    """The mean reward and how many grades had each reason (timeouts and crashes included), as step metrics."""
    metrics.add_mean(REWARD_MEAN, sum(g.score for g in grades), len(grades))
    for reason, metric in REWARD_REASONS.items():
        metrics.add_total(metric, sum(g.reason == reason for g in grades))
