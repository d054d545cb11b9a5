"""Prompt datasets: problems with verifiable answers, from JSONL, Parquet or the bundled sets.

Each row needs a problem and either an answer or a solution whose last
\\boxed{} holds the answer (MATH's training set has only solutions). Field
names are configurable; by default the first present of `problem` /
`question`, `answer`, and `solution` is used. A malformed row (not JSON, not
an object, a missing or empty field, a solution without \\boxed{}) stops
loading with its file and line, or, with `on_malformed="skip"`, is counted and
reported (never silently dropped).

Bundled names: `math500` (evaluation), `math_train_slice` (a 500-problem
slice of MATH train); data/datasets.py adds the generated sets.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from popo_megatron.errors import UserError
from popo_megatron.reward.extract import last_boxed

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {"math500": BUNDLED_DIR / "math500.jsonl", "math_train_slice": BUNDLED_DIR / "math_train_slice.jsonl"}
PROBLEM_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer",)
SOLUTION_KEYS = ("solution",)


class DataError(UserError):
    """A dataset file or row that cannot be used; the message names the file and line (or row)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str  # LaTeX, compared with math-verify
    source: str  # "file:line" (or "file:row N" for Parquet, "synthetic:N")
    kind: str = ""  # a category results are also reported by (arithmetic_words: the operation)


@dataclass
class ProblemSet:
    problems: list[Problem]
    name: str
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped (on_malformed="skip")
    skipped_examples: list[str] = field(default_factory=list)  # the first few messages, for the log

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]

    def prompt_blind_accuracy(self) -> float:
        """The accuracy of the best answer given without reading the problem: the most frequent gold answer's
        share. A model that learned only the answer distribution scores this; learning means beating it."""
        if not self.problems:
            return float("nan")
        counts = Counter(p.answer.strip() for p in self.problems)
        return counts.most_common(1)[0][1] / len(self.problems)


def hash_split(key: str, heldout_one_in: int) -> str:
    """ "heldout" for about one key in `heldout_one_in`, else "train": a function of the key alone (SHA-256), so
    a generated problem's split is the same on every machine and run, whatever else is generated with it."""
    digest = hashlib.sha256(key.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % heldout_one_in == 0 else "train"


@dataclass(frozen=True)
class Fields:
    """Which columns hold what; None: the first present of the defaults."""

    problem: str | None = None
    answer: str | None = None
    solution: str | None = None

    @classmethod
    def from_config(cls, data_cfg) -> "Fields":
        return cls(data_cfg.problem_key, data_cfg.answer_key, data_cfg.solution_key)


def _pick(row: dict, chosen: str | None, defaults: Sequence[str]) -> tuple[str | None, Any]:
    for key in (chosen,) if chosen else defaults:
        if key in row and row[key] is not None:
            return key, row[key]
    return None, None


def problem_from_row(row: Any, fields: Fields, where: str) -> Problem:
    """The Problem of one row, or DataError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with a problem and an answer, got {type(row).__name__}", "not_an_object"
        )
    problem_key, problem = _pick(row, fields.problem, PROBLEM_KEYS)
    wanted = fields.problem or " or ".join(PROBLEM_KEYS)
    if problem_key is None:
        raise DataError(f"{where}: no {wanted!r} field (fields: {sorted(row)}); set data.problem_key", "no_problem")
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field {problem_key!r} is empty or not text", "empty_problem")
    answer_key, answer = _pick(row, fields.answer, ANSWER_KEYS)
    if answer_key is not None:
        answer = str(answer).strip()  # numeric answers in Parquet / JSON
        if not answer:
            raise DataError(f"{where}: field {answer_key!r} is empty", "empty_answer")
        return Problem(problem, answer, where)
    solution_key, solution = _pick(row, fields.solution, SOLUTION_KEYS)
    if solution_key is None:
        wanted = " or ".join(k for k in (fields.answer or ANSWER_KEYS[0], fields.solution or SOLUTION_KEYS[0]))
        raise DataError(f"{where}: neither {wanted} field (fields: {sorted(row)}); set data.answer_key", "no_answer")
    boxed = last_boxed(str(solution))
    if not boxed:
        raise DataError(f"{where}: field {solution_key!r} has no \\boxed{{}} answer", "no_boxed_answer")
    return Problem(problem, boxed, where)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", "invalid_json")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, row in enumerate(table.to_pylist()):
        yield f"{path}:row {number}", row


def load_problems(source: str | Path, fields: Fields = Fields(), on_malformed: str = "error") -> ProblemSet:
    """Problems of a bundled set (by name) or of a .jsonl / .parquet file."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    path = BUNDLED.get(str(source), Path(source))
    if not path.is_file():
        raise DataError(f"{source}: no such dataset file (bundled sets: {', '.join(sorted(BUNDLED))}, synthetic)")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: unsupported format {path.suffix!r}; use .jsonl or .parquet")
    loaded = ProblemSet([], str(source))
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            loaded.problems.append(problem_from_row(row, fields, where))
        except DataError as exc:
            if on_malformed == "error":
                raise
            loaded.skipped[exc.reason] += 1
            if len(loaded.skipped_examples) < 5:
                loaded.skipped_examples.append(str(exc))
    if not loaded.problems:
        skipped = f" (skipped: {dict(loaded.skipped)})" if loaded.skipped else ""
        raise DataError(f"{path}: no usable problems{skipped}", "empty")
    return loaded
