"""The example configs load, and validate for the models and world sizes their comments name."""

from __future__ import annotations

from pathlib import Path

import pytest

from popo_megatron.config import load_config, validate_config
from popo_megatron.model.hf_config import parse_hf_config

EXAMPLES = Path(__file__).parent.parent / "examples"
# config.json fields of the public checkpoints the large examples are for.
QWEN25_MATH_7B = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
QWEN25_32B = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=27648,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    max_position_embeddings=32768,
)
ARITHMETIC = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=16,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.mark.parametrize(
    "name, model, worlds, cuda",
    [
        ("tiny_cpu.yaml", ARITHMETIC, [1], False),
        ("tiny_cpu_grpo.yaml", ARITHMETIC, [1], False),
        ("qwen2.5-math-7b_popo.yaml", QWEN25_MATH_7B, [8, 16], True),
        ("qwen2.5-32b_popo.yaml", QWEN25_32B, [32, 64], True),
    ],
)
def test_example_validates(name, model, worlds, cuda):
    cfg = load_config(EXAMPLES / name)
    for world in worlds:
        validate_config(cfg, world, parse_hf_config(model), cuda_available=cuda)


def test_examples_are_all_covered():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert names == {"tiny_cpu.yaml", "tiny_cpu_grpo.yaml", "qwen2.5-math-7b_popo.yaml", "qwen2.5-32b_popo.yaml"}
