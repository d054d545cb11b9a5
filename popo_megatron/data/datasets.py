"""Which problems a data name refers to: the synthetic arithmetic task (`synthetic`, `synthetic:heldout`),
the generated word problems (`arithmetic_words:train` / `:heldout`), a bundled set or a file."""

from __future__ import annotations

from popo_megatron.data.problems import Fields, ProblemSet, load_problems
from popo_megatron.data.synthetic import ArithmeticTask
from popo_megatron.data.word_problems import word_problems

GENERATED_ARITHMETIC = ("synthetic", "arithmetic_words")


def literal_answers_by_default(data_cfg) -> bool:
    """Whether `reward.require_literal` is on when unset: for the generated arithmetic sets of data.train,
    whose answers are integers computed from the problem's own numbers (so restating the problem, which
    math-verify would evaluate, must not score)."""
    return data_cfg.train.partition(":")[0] in GENERATED_ARITHMETIC


def load_dataset(data_cfg, name: str | None = None) -> ProblemSet:
    """The problems of `name` (default: data.train): the synthetic task, a bundled set or a file."""
    name = name or data_cfg.train
    if name == "synthetic" or name.startswith("synthetic:"):
        return ArithmeticTask.from_config(data_cfg.synthetic).problems(name.partition(":")[2] or "train")
    if name.startswith("arithmetic_words:"):
        return word_problems(name.partition(":")[2])
    return load_problems(name, Fields.from_config(data_cfg), data_cfg.on_malformed)
