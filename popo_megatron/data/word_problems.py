"""Arithmetic word problems for a real pretrained model: a train split and a held-out split, generated.

Add, subtract and multiply with 2-digit operands (10-99), in varied phrasing
(bare questions and short stories). A problem is the triple (operation, a, b);
which split it belongs to is a function of that triple alone (a hash), so the
splits are disjoint whatever their sizes, and the same on every machine and
run. Answers are integers (subtraction takes the larger operand first), graded
by math-verify from the model's `\\boxed{}`.

Dataset names (`data.train`, `popo eval --benchmark`): `arithmetic_words:train`
(2,000 problems) and `arithmetic_words:heldout` (200), both drawn without
repetition, a third of each operation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from popo_megatron.data.problems import DataError, Problem, ProblemSet, hash_split

NAME = "arithmetic_words"
SPLIT_SIZES = {"train": 2000, "heldout": 200}
HELDOUT_SHARE = 10  # one triple in ten is held out

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cards", "shells"]
TEMPLATES = {
    "add": [
        "What is {a} + {b}?",
        "What is the sum of {a} and {b}?",
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "A shelf holds {a} {item} and another holds {b}. How many {item} are there in total?",
    ],
    "subtract": [
        "What is {a} - {b}?",
        "What is {a} minus {b}?",
        "{name} has {a} {item} and gives away {b}. How many {item} are left?",
        "A box held {a} {item}; {b} were taken out. How many {item} remain in the box?",
    ],
    "multiply": [
        "What is {a} * {b}?",
        "What is the product of {a} and {b}?",
        "{name} buys {a} packs of {item} with {b} in each pack. How many {item} is that?",
        "There are {a} rows with {b} {item} in each row. How many {item} are there?",
    ],
}
OPERATIONS = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b}


@dataclass(frozen=True)
class WordProblem:
    operation: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return OPERATIONS[self.operation](self.a, self.b)

    @property
    def split(self) -> str:
        return hash_split(f"{self.operation}:{self.a}:{self.b}", HELDOUT_SHARE)


def _all_triples() -> list[WordProblem]:
    triples = []
    for operation in OPERATIONS:
        for a in range(10, 100):
            for b in range(10, 100):
                if operation == "subtract" and b > a:
                    continue
                triples.append(WordProblem(operation, a, b))
    return triples


def word_problems(split: str, size: int | None = None, seed: int = 0) -> ProblemSet:
    """`size` problems of the split (default SPLIT_SIZES[split]), a third of each operation, in random order;
    the same for the same arguments."""
    if split not in SPLIT_SIZES:
        raise DataError(f"{NAME}: unknown split {split!r}; choose from {sorted(SPLIT_SIZES)}")
    size = SPLIT_SIZES[split] if size is None else size
    rng = random.Random(f"{NAME}:{split}:{seed}")
    chosen = []
    for index, operation in enumerate(OPERATIONS):  # the operations in equal shares
        pool = [t for t in _all_triples() if t.split == split and t.operation == operation]
        count = size // len(OPERATIONS) + (index < size % len(OPERATIONS))
        if count > len(pool):
            raise DataError(f"{NAME}:{split}: {count} {operation} problems asked for, the split has {len(pool)}")
        chosen += rng.sample(pool, count)
    rng.shuffle(chosen)
    rows = []
    for i, triple in enumerate(chosen):
        template = rng.choice(TEMPLATES[triple.operation])
        text = template.format(a=triple.a, b=triple.b, name=rng.choice(NAMES), item=rng.choice(ITEMS))
        source = f"{NAME}:{split}:{i}:{triple.operation}:{triple.a}:{triple.b}"
        rows.append(Problem(text, str(triple.answer), source, triple.operation))
    return ProblemSet(rows, f"{NAME}:{split}")
