"""Generated arithmetic word problems: deterministic, correct answers, disjoint train and held-out splits."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from omegaconf import OmegaConf

from popo_megatron.config.schema import DataConfig
from popo_megatron.data.datasets import load_dataset
from popo_megatron.data.word_problems import SPLIT_SIZES, word_problems

EXPECTED = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b}


def _triple(problem) -> tuple[str, int, int]:
    _, _, _, operation, a, b = problem.source.split(":")
    return operation, int(a), int(b)


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_problems_state_their_numbers_and_answers_are_right(split):
    problems = word_problems(split)
    assert len(problems) == SPLIT_SIZES[split] and problems.name == f"arithmetic_words:{split}"
    for problem in problems.problems:
        operation, a, b = _triple(problem)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert re.findall(r"\d+", problem.problem) == [str(a), str(b)], problem.problem
        assert problem.answer == str(EXPECTED[operation](a, b)) and int(problem.answer) >= 0
    operations = Counter(_triple(p)[0] for p in problems.problems)
    assert set(operations) == set(EXPECTED) and max(operations.values()) - min(operations.values()) <= 1, operations
    assert len({p.problem for p in problems.problems}) > 0.95 * len(problems), "varied phrasing and numbers"


def test_splits_are_disjoint_and_deterministic():
    train, heldout = word_problems("train"), word_problems("heldout")
    assert not {_triple(p) for p in train.problems} & {_triple(p) for p in heldout.problems}
    assert len({_triple(p) for p in train.problems}) == len(train), "no repeats within a split"
    assert [p.problem for p in word_problems("heldout").problems] == [p.problem for p in heldout.problems]
    assert [p.problem for p in word_problems("heldout", seed=1).problems] != [p.problem for p in heldout.problems]
    # The split of a triple does not depend on how many problems are drawn.
    larger = word_problems("heldout", size=400)
    assert {_triple(p) for p in larger.problems} & {_triple(p) for p in train.problems} == set()


def test_loaded_by_name_and_bad_names_are_refused():
    data = OmegaConf.structured(DataConfig)
    assert [p.problem for p in load_dataset(data, "arithmetic_words:heldout").problems] == [
        p.problem for p in word_problems("heldout").problems
    ]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_dataset(data, "arithmetic_words:test")
    with pytest.raises(ValueError, match="the split has"):
        word_problems("heldout", size=10**6)
