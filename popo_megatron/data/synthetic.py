"""The synthetic arithmetic task and its 16-token tokenizer: the embedded default's data.

Problems are "a+b=" (operands, operations and their range are the difficulty
knobs); answers are integers. The tokenizer has one token per character
(digits, + - * =) plus <pad> and <eos>, so a tiny randomly initialised model
that samples from 16 tokens answers correctly now and then from the start
(the reward reads the last number of the response: `reward.answer_fallbacks:
[last_number]`): a signal that positive-only learning can amplify.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from popo_megatron.data.problems import Problem, ProblemSet

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "-", "*", "="]
PAD, EOS = "<pad>", "<eos>"
OPERATIONS = "+-*"


@dataclass(frozen=True)
class ArithmeticTask:
    size: int = 4096
    max_operand: int = 4  # operands are drawn from 0..max_operand
    operands: int = 2
    operations: str = "+"  # any of "+-*"
    seed: int = 0

    @classmethod
    def from_config(cls, synthetic_cfg) -> "ArithmeticTask":
        return cls(
            synthetic_cfg.size,
            synthetic_cfg.max_operand,
            synthetic_cfg.operands,
            synthetic_cfg.operations,
            synthetic_cfg.seed,
        )

    def problems(self) -> ProblemSet:
        """`size` problems, the same for the same settings; usual precedence (* before + and -)."""
        rng = random.Random(self.seed)
        rows = []
        for i in range(self.size):
            text = str(rng.randint(0, self.max_operand))
            for _ in range(self.operands - 1):
                text += rng.choice(self.operations) + str(rng.randint(0, self.max_operand))
            # Digits and + - * only, built here: Python's arithmetic is the reference.
            result = eval(text, {"__builtins__": {}})
            rows.append(Problem(text + "=", str(result), f"synthetic:{i}"))
        return ProblemSet(rows, "synthetic")


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
    from popo_megatron.model.tiny import save_random_hf_model

    path = save_random_hf_model(path, "Qwen2Config", seed, **ARITHMETIC_QWEN2)
    arithmetic_tokenizer().save_pretrained(path)
    return path


# model.hf_path value for the embedded default: a tiny random Qwen2 with this task's tokenizer, generated
# (seeded by `seed`) under OUTPUT_DIR on first use.
GENERATED_ARITHMETIC = "generate:arithmetic"


def generated_model_overrides(cfg) -> list[str]:
    """Overrides that point model.hf_path at a real directory, creating the generated model if asked for."""
    if cfg.model.hf_path != GENERATED_ARITHMETIC:
        return []
    path = Path(cfg.train.output_dir).absolute() / "initial_model"
    if not (path / "config.json").is_file():
        save_arithmetic_model(path, seed=cfg.seed)
    return [f"model.hf_path={path}"]
