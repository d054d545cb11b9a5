"""Find the final answer in a model's response (or a reference solution).

The last `\\boxed{...}` (or `\\fbox{...}`) wins; when there is none, the
configured fallbacks are tried in order:

    answer_is    "... the answer is X" (up to the end of the line or sentence)
    last_math    the last $...$ or \\(...\\) math span
    last_number  the last number (integer, decimal or a/b fraction)
    only_number  the whole response, when it is one number and nothing else (a strict format: a
                 tiny model's answer followed by filler scores nothing)

Everything is linear in the length of the text and needs no recursion, so an
adversarial response (megabytes, thousands of nested braces) costs one scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FALLBACKS = ("answer_is", "last_math", "last_number", "only_number")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Extracted:
    answer: str
    source: str  # "boxed" or the fallback that found it


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} with balanced braces (or `\\boxed 5`), else None."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    closing = _matching_braces(text)
    for match in reversed(boxes):
        start = match.end()
        if start < len(text) and text[start] == "{":
            if start in closing:
                return text[start + 1 : closing[start]].strip()
            continue  # unbalanced: try an earlier box
        token = re.match(r"[^\s$]+", text[start:])
        if token:
            return token.group(0)
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each "{" -> index of its "}", in one pass (unmatched braces are left out)."""
    closing, stack = {}, []
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            closing[stack.pop()] = i
    return closing


def extract_answer(text: str, fallbacks: tuple[str, ...] | list[str] = ()) -> Extracted | None:
    boxed = last_boxed(text)
    if boxed:
        return Extracted(boxed, "boxed")
    for name in fallbacks:
        found = _FALLBACK_FUNCS[name](text)
        if found:
            return Extracted(found.strip(), name)
    return None


def _answer_is(text: str) -> str | None:
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip().strip("$") if matches else None


def _last_math(text: str) -> str | None:
    """The last $...$ (non-empty) or \\(...\\) span, matched left to right as a regex alternation would
    be, in one pass: each closing delimiter is searched from a pointer that only moves forward (a regex
    retries the search from every unclosed opening, quadratic in a response of many of them)."""
    last, i, n = None, 0, len(text)
    dollar = paren = -2  # the next "$" / "\\)" at or after the position last searched from
    while i < n:
        if text[i] == "$":
            if dollar != -1 and dollar <= i:
                dollar = text.find("$", i + 1)
            if dollar > i + 1:  # "$$" is no span: move on by one, as the regex does
                last, i = text[i + 1 : dollar], dollar + 1
                continue
        elif text.startswith("\\(", i):
            if paren != -1 and paren < i + 3:
                paren = text.find("\\)", i + 3)
            if paren != -1:
                last, i = text[i + 2 : paren], paren + 2
                continue
        i += 1
    return last


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def _only_number(text: str) -> str | None:
    match = _NUMBER.fullmatch(text.strip())
    return match.group(0) if match else None


_FALLBACK_FUNCS = {
    "answer_is": _answer_is,
    "last_math": _last_math,
    "last_number": _last_number,
    "only_number": _only_number,
}
