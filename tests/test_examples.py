"""The example configs load, and validate for the models and world sizes their comments name."""

from __future__ import annotations

from pathlib import Path

import pytest
from public_shapes import PUBLIC_SHAPES

from popo_megatron.config import load_config
from popo_megatron.config.validate import validate_config
from popo_megatron.data.synthetic import ARITHMETIC_QWEN2
from popo_megatron.model.hf_config import parse_hf_config

EXAMPLES = Path(__file__).parent.parent / "examples"
ARITHMETIC = {"architectures": ["Qwen2ForCausalLM"], **ARITHMETIC_QWEN2}


@pytest.mark.parametrize(
    "name, model, worlds, cuda",
    [
        ("tiny_cpu.yaml", ARITHMETIC, [1], False),
        ("tiny_cpu_grpo.yaml", ARITHMETIC, [1], False),
        ("tiny_cpu_grpo_vanilla.yaml", ARITHMETIC, [1], False),
        ("tiny_cpu_grpo_trl.yaml", ARITHMETIC, [1], False),
        ("smollm2_arithmetic.yaml", PUBLIC_SHAPES["smollm2-135m-instruct"], [1], False),
        ("qwen2.5-math-7b_popo.yaml", PUBLIC_SHAPES["qwen2.5-math-7b"], [8, 16], True),
        ("qwen2.5-32b_popo.yaml", PUBLIC_SHAPES["qwen2.5-32b"], [32, 64], True),
        ("qwen2.5-32b_popo_16k.yaml", PUBLIC_SHAPES["qwen2.5-32b"], [32, 64], True),
    ],
)
def test_example_validates(name, model, worlds, cuda):
    cfg = load_config(EXAMPLES / name)
    for world in worlds:
        validate_config(cfg, world, parse_hf_config(model), cuda_available=cuda, te_installed=cuda)


def test_examples_are_all_covered():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert names == {
        "tiny_cpu.yaml",
        "tiny_cpu_grpo.yaml",
        "tiny_cpu_grpo_vanilla.yaml",
        "tiny_cpu_grpo_trl.yaml",
        "smollm2_arithmetic.yaml",
        "qwen2.5-math-7b_popo.yaml",
        "qwen2.5-32b_popo.yaml",
        "qwen2.5-32b_popo_16k.yaml",
    }


@pytest.mark.parametrize("name", ["tiny_cpu_grpo.yaml", "tiny_cpu_grpo_vanilla.yaml", "tiny_cpu_grpo_trl.yaml"])
def test_grpo_baselines_share_the_main_jobs_task_and_budget(name):
    """A comparison with the main job is fair only on the same task, sampling, evaluation and budget."""
    main, baseline = load_config(EXAMPLES / "tiny_cpu.yaml"), load_config(EXAMPLES / name)
    for section in ("model", "data", "eval", "reward", "rollout", "loss"):
        assert baseline[section] == main[section], section
    assert {**baseline.train, "output_dir": None} == {**main.train, "output_dir": None}
    # Each method at its own learning rate from the same grid (bench/bench_train.py --lr-grid).
    assert {**baseline.optim, "lr": None} == {**main.optim, "lr": None}
    assert baseline.seed == main.seed
