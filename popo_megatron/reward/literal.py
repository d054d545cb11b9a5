"""Literal numbers: an answer that states a value, not an expression for it (`reward.require_literal`).

math-verify evaluates what it parses, so `\\boxed{24 \\times 18}` is graded right for 432: on a task whose
answer is computed from numbers in the problem, a model can score by restating the problem inside the box
instead of computing it (SmolLM2 on `arithmetic_words` learned exactly that). Under
`reward.require_literal`, a problem whose gold answer is a literal number accepts only a literal number:
anything else is graded `not_literal`, whatever it evaluates to. A problem whose gold is not a literal
(an expression, an interval, `\\sqrt{2}`) is graded by math-verify as before.

A literal, as a person states a result:
  - an optional sign (`-` or `+`);
  - digits, optionally in groups of three split by `,` or LaTeX's `{,}` (1,234,567);
  - optionally a decimal point and digits (432.0 is 432);
  - or a fraction `a/b`, `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`) of plain digits, with a sign in front:
    a literal only when the gold answer is itself written as a fraction, and only in lowest terms
    (3/4 for 3/4, not 6/8; never 864/2 for 432).
Spaces and `$` around it are dropped. Nothing else is a literal: no units, no `%`, no exponent (4.32e2),
no `\\text{}`. Values are compared exactly (as fractions). The scan is a regular-expression match of
linear cost, and a literal of more than MAX_DIGITS digits is never equal to anything (no huge integers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DIGITS = 100
_INTEGER = r"\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+"
_DECIMAL = re.compile(rf"(?P<sign>[+-]?)\s*(?P<whole>{_INTEGER})(?:\.(?P<frac>\d+))?")
_FRACTION = re.compile(
    r"(?P<sign>[+-]?)\s*(?:(?P<a>\d+)\s*/\s*(?P<b>\d+)|\\[dt]?frac\s*\{\s*(?P<fa>\d+)\s*\}\s*\{\s*(?P<fb>\d+)\s*\})"
)


@dataclass(frozen=True)
class Literal:
    value: Fraction | None  # None: more than MAX_DIGITS digits (equal to nothing)
    fraction: bool  # written as a fraction a/b
    lowest_terms: bool  # a fraction whose numerator and denominator share no factor (True for the others)


def parse_literal(text: str) -> Literal | None:
    """The literal number `text` states, or None when it is anything else."""
    text = text.strip().strip("$").strip()
    decimal = _DECIMAL.fullmatch(text)
    if decimal:
        whole = re.sub(r"\{,\}|,", "", decimal["whole"])
        digits = whole + (decimal["frac"] or "")
        if len(digits) > MAX_DIGITS:
            return Literal(None, False, True)
        value = Fraction(int(digits), 10 ** len(decimal["frac"] or ""))
        return Literal(-value if decimal["sign"] == "-" else value, False, True)
    fraction = _FRACTION.fullmatch(text)
    if fraction:
        a, b = fraction["a"] or fraction["fa"], fraction["b"] or fraction["fb"]
        if len(a) + len(b) > MAX_DIGITS:
            return Literal(None, True, True)
        numerator, denominator = int(a), int(b)
        if denominator == 0:
            return None  # not a number at all
        value = Fraction(numerator, denominator)
        return Literal(-value if fraction["sign"] == "-" else value, True, math.gcd(numerator, denominator) == 1)
    return None


def literal_verdict(answer: str, gold: str) -> str | None:
    """ "correct", "mismatch" or "not_literal" for `answer` when `gold` is a literal number; None when it is
    not (the literal rule does not apply: math-verify grades it)."""
    expected = parse_literal(gold)
    if expected is None:
        return None
    given = parse_literal(answer)
    if given is None or (given.fraction and not (expected.fraction and given.lowest_terms)):
        return "not_literal"
    same = given.value is not None and expected.value is not None and given.value == expected.value
    return "correct" if same else "mismatch"
