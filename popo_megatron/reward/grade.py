"""A verifier's verdict on one response: its score and why."""

from __future__ import annotations

from dataclasses import dataclass

# Every grade carries exactly one reason.
REASONS = ("correct", "mismatch", "no_answer", "parse_failure", "bad_gold", "timeout", "worker_crash")


@dataclass(frozen=True)
class Grade:
    score: float
    reason: str
    answer: str | None = None  # what was extracted from the response

    @property
    def correct(self) -> bool:
        return self.reason == "correct"
