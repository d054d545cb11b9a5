"""The main job's config sized for tests of the trainer's mechanics, and reading what a run leaves behind."""

from __future__ import annotations

from pathlib import Path

import torch

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_cpu.yaml"
# The main job's task and grading leave a random model right in ~0.5% of its samples: a step of 32 samples
# would often have no positive. These checks are of the mechanics, not of learning: the old, easy setting
# (answers 0-8, the last number of 4 tokens graded) gives positives in most small steps.
EASY = ["data.synthetic.max_operand=4", "reward.answer_fallbacks=[last_number]", "rollout.max_tokens=4"]
SMALL = ["train.prompts_per_step=8", "rollout.n=4", "train.micro_batch_size=8", "reward.workers=1", *EASY]


def records(out: Path) -> list[dict]:
    from popo_megatron.trainer.logbook import read_metrics

    return read_metrics(out / "metrics.jsonl")


def deterministic(record: dict) -> dict:
    """Everything a step writes except wall-clock times."""
    return {k: v for k, v in record.items() if not k.startswith("time_") and k not in ("tokens_per_s", "all")}


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(checkpoint_id=str(ckpt / "megatron"))


def assert_same_run(a: Path, b: Path, step: int) -> None:
    """Two runs wrote the same metrics and, at `step`, bit-identical weights, optimizer state and twin."""
    assert [deterministic(r) for r in records(a)] == [deterministic(r) for r in records(b)]
    name = f"step_{step:06d}"
    tensors_a = checkpoint_tensors(a / "checkpoints" / name)
    tensors_b = checkpoint_tensors(b / "checkpoints" / name)
    assert sorted(tensors_a) == sorted(tensors_b)
    assert any(k.startswith("twin.") for k in tensors_a) and any(k.startswith("optimizer.") for k in tensors_a)
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), f"{key} differs between {a} and {b}"
