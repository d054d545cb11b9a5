"""Whether an answer restates its problem: the shape of a reward earned without solving the task.

math-verify evaluates expressions, so on a task whose answer is computed from the problem's numbers a model
can score with `\\boxed{31 + 88}` for "What is 31 + 88?". An extracted answer that holds two or more of the
problem's own numbers and an arithmetic operator is such a restatement (a heuristic: a correct fraction
"3/4" for a problem about 3 and 4 counts too). The trainer counts the correct answers that do
(`reward/restated_problem`) and warns when they are most of a step's (trainer/watch.py);
`reward.require_literal` is the fix. Linear in the lengths of both texts.
"""

from __future__ import annotations

import re
from collections import Counter

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPERATOR = re.compile(r"[-+*/^×÷·]|\\(?:times|cdot|div|[dt]?frac)")


def restates_problem(answer: str | None, problem: str) -> bool:
    """`answer` holds an operator and at least two numbers that also occur in `problem` (with multiplicity)."""
    if not answer or not _OPERATOR.search(answer):
        return False
    numbers = Counter(_NUMBER.findall(answer))
    if sum(numbers.values()) < 2:
        return False
    return sum((numbers & Counter(_NUMBER.findall(problem))).values()) >= 2
