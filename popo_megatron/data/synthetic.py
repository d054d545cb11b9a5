"""The synthetic arithmetic task and its 16-token tokenizer: the embedded default's data.

Problems are "a+b=" with every operand in min_operand..max_operand (operands, operations
and their range are the difficulty knobs); answers are integers. The task is
every such problem, cut into a training split (`data.train: synthetic`) and a
held-out split (`synthetic:heldout`, about one problem in five) by a hash of
the problem text: the split of a problem never depends on the other settings,
and the run never trains on a held-out problem.

The tokenizer has one token per character (digits, + - * =) plus <pad> and
<eos>. The embedded default grades the response strictly (`only_number`: the
digits of the answer and nothing else, ended by <eos>): a random model is
right now and then, and a positive teaches the answer, not filler around it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from popo_megatron.config.schema import SyntheticConfig
from popo_megatron.data.problems import DataError, Problem, ProblemSet, hash_split

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "-", "*", "="]
PAD, EOS = "<pad>", "<eos>"
OPERATIONS = "+-*"
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 5  # one problem in five is held out
MAX_PROBLEMS = 1_000_000  # the task is enumerated: the knobs may not ask for more


@dataclass
class ArithmeticTask(SyntheticConfig):
    """The task of `data.synthetic` (its fields and defaults are the schema's): the problems it enumerates."""

    @classmethod
    def from_config(cls, synthetic_cfg) -> ArithmeticTask:
        return cls(**OmegaConf.to_container(synthetic_cfg))

    def count(self) -> int:
        """The number of distinct problems (both splits)."""
        values = max(0, self.max_operand - self.min_operand + 1)
        return values**self.operands * len(set(self.operations)) ** (self.operands - 1)

    def problems(self, split: str = "train") -> ProblemSet:
        """The split's problems, the same for the same settings; usual precedence (* before + and -)."""
        if split not in SPLITS:
            raise DataError(f"synthetic:{split}: unknown split; choose one of {', '.join(SPLITS)}")
        rows = []
        values = range(self.min_operand, self.max_operand + 1)
        for numbers in itertools.product(values, repeat=self.operands):
            for ops in itertools.product(sorted(set(self.operations)), repeat=self.operands - 1):
                text = str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:], strict=True))
                if hash_split(text, HELDOUT_SHARE) == split:
                    # Digits and + - * only, built here: Python's arithmetic is the reference.
                    rows.append((text, str(eval(text, {"__builtins__": {}}))))
        random.Random(self.seed).shuffle(rows)
        if self.size:
            rows = rows[: self.size]
        name = "synthetic" if split == "train" else f"synthetic:{split}"
        return ProblemSet([Problem(t + "=", a, f"{name}:{t}") for t, a in rows], name)


def arithmetic_tokenizer():
    """A transformers fast tokenizer over VOCAB, one token per character, decoding without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=PAD)


# A Qwen2 shaped for the task: vocab = the tokenizer's; head_dim 64 (vLLM's CPU attention needs >= 32).
ARITHMETIC_QWEN2 = dict(
    vocab_size=len(VOCAB),
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,  # divisible by TP=2: checkpoints move between TP=1 and TP=2 as they are
    max_position_embeddings=128,
    rope_theta=1e4,
    tie_word_embeddings=True,
    bos_token_id=VOCAB.index(EOS),
    eos_token_id=VOCAB.index(EOS),
    pad_token_id=VOCAB.index(PAD),
)


def save_arithmetic_model(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen2 with the task's tokenizer, as an HF model directory."""
    from popo_megatron.model.random_model import save_random_hf_model

    path = save_random_hf_model(path, "Qwen2Config", seed, **ARITHMETIC_QWEN2)
    arithmetic_tokenizer().save_pretrained(path)
    return path
