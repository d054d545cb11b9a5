"""What a resumed run continues from and what its config changes (checkpoint/runs.py), on checkpoint
directories written by hand: the parts of a checkpoint this logic reads are trainer_state.json and the
model's config.json. tests/test_trainer.py checks the same through `popo train` on real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from popo_megatron.checkpoint.runs import ResumeError, config_changes, plan_resume
from popo_megatron.config import load_config

MODEL = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}


def _model(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _run(out: Path, model: Path, step: int = 3) -> list[str]:
    """A run directory whose newest checkpoint was saved after `step` with the config returned."""
    overrides = [f"model.hf_path={model}", f"train.output_dir={out}", "train.steps=5", "rollout.n=4"]
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    _model(ckpt / "hf", json.loads((model / "config.json").read_text()))
    saved = OmegaConf.to_container(load_config(None, overrides), resolve=True, enum_to_str=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "config": saved}))
    (out / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return overrides


def test_changes_are_the_keys_both_configs_have_with_other_values():
    saved = {"optim": {"lr": 1e-3, "min_lr": 0.0}, "train": {"output_dir": "a", "steps": 5}, "gone": 1}
    new = {"optim": {"lr": 5e-4, "min_lr": 0.0}, "train": {"output_dir": "b", "steps": 5}, "added": 2}
    changes = config_changes(saved, new)
    assert [(c.key, c.saved, c.new) for c in changes] == [("optim.lr", 1e-3, 5e-4)]
    assert str(changes[0]) == "optim.lr: 0.001 -> 0.0005"


def test_a_fresh_run_has_no_plan(tmp_path):
    model = _model(tmp_path / "model", MODEL)
    overrides = [f"model.hf_path={model}", f"train.output_dir={tmp_path / 'new'}"]
    assert plan_resume(load_config(None, overrides)) is None
    overrides = _run(tmp_path / "run", model)
    assert plan_resume(load_config(None, [*overrides, "train.resume=false"])) is None


def test_allowed_changes_are_listed_and_fixed_ones_refused_with_the_way_out(tmp_path):
    model = _model(tmp_path / "model", MODEL)
    overrides = _run(tmp_path / "run", model)
    plan = plan_resume(load_config(None, [*overrides, "rollout.temperature=0.7", "train.steps=8"]))
    assert plan.step == 3 and plan.checkpoint.name == "step_000003"
    assert sorted(str(c) for c in plan.changes) == ["rollout.temperature: 1.0 -> 0.7", "train.steps: 5 -> 8"]
    for key, value in [("rollout.n", 8), ("data.synthetic.max_operand", 9), ("algorithm", "grpo"), ("seed", 7)]:
        with pytest.raises(ResumeError, match=rf"{key}: .* -> .*train.output_dir.*train.resume=false") as err:
            plan_resume(load_config(None, [*overrides, f"{key}={value}", "rollout.temperature=0.7"]))
        assert "rollout.temperature" not in str(err.value), "only the refused keys are named"


def test_the_same_model_at_another_path_continues_another_model_does_not(tmp_path):
    model = _model(tmp_path / "model", MODEL)
    overrides = _run(tmp_path / "run", model)
    moved = _model(tmp_path / "elsewhere" / "model", MODEL)
    plan = plan_resume(load_config(None, [*overrides, f"model.hf_path={moved}"]))
    assert [c.key for c in plan.changes] == ["model.hf_path"]
    other = _model(tmp_path / "other", {**MODEL, "hidden_size": 128})
    with pytest.raises(ResumeError, match="model.hf_path: .*trained from another model"):
        plan_resume(load_config(None, [*overrides, f"model.hf_path={other}"]))


def test_resume_from_another_runs_checkpoint_is_compared_with_that_runs_config(tmp_path):
    model = _model(tmp_path / "model", MODEL)
    _run(tmp_path / "run", model)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    overrides = [f"model.hf_path={model}", f"train.output_dir={tmp_path / 'new'}", "rollout.n=4"]
    plan = plan_resume(load_config(None, [*overrides, "train.steps=5", f"train.resume_from={checkpoint}"]))
    assert plan.checkpoint == checkpoint and plan.changes == [], "output_dir and resume_from are not changes"


def _checkpoints(root: Path, steps: list[int], latest: int | None) -> None:
    for step in steps:
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    if latest is not None:
        (root / "latest").write_text(f"step_{latest:06d}\n")


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "superseded")


def test_keep_last_orders_by_step_and_never_removes_latest(tmp_path):
    from popo_megatron.checkpoint.runs import remove_old

    root = tmp_path / "checkpoints"
    # After a rollback to step 2 (`latest`), and past step 999999 where the names stop sorting as numbers.
    _checkpoints(root, [2, 9, 10, 1_000_000], latest=2)
    remove_old(root, keep=2)
    assert _names(root) == ["latest", "step_000002", "step_000010", "step_1000000"]


def test_a_rollback_sets_the_later_history_aside(tmp_path):
    from popo_megatron.checkpoint.runs import LATEST, latest_checkpoint, set_aside_later

    out = tmp_path / "run"
    root = out / "checkpoints"
    _checkpoints(root, [1, 2, 3, 4], latest=4)
    (root / ".step_000005.deleting").mkdir()  # a deletion a crash interrupted
    moved = set_aside_later(out, 2, root / "step_000002")  # train.resume_from=.../step_000002
    assert _names(root) == ["latest", "step_000001", "step_000002"]
    assert latest_checkpoint(out).name == "step_000002", "latest names the checkpoint resumed from"
    assert moved.parent == root / "superseded" and sorted(p.name for p in moved.iterdir()) == [
        "step_000003",
        "step_000004",
    ]
    # Resumed from latest while a later save's `latest` never moved: that save is set aside, latest stays.
    _checkpoints(root, [3], latest=None)
    assert set_aside_later(out, 2, root / "step_000002") is not None
    assert _names(root) == ["latest", "step_000001", "step_000002"]
    # Nothing after the start: nothing moves.
    assert set_aside_later(out, 2, root / "step_000002") is None
    # From another run's checkpoint at step 1: this directory's later ones and its latest go aside.
    elsewhere = tmp_path / "other" / "checkpoints" / "step_000001"
    assert set_aside_later(out, 1, elsewhere) is not None
    assert _names(root) == ["step_000001"] and not (root / LATEST).exists()
    # A fresh run (train.resume=false): everything.
    _checkpoints(root, [7], latest=7)
    moved = set_aside_later(out, 0, None)
    assert _names(root) == [] and sorted(p.name for p in moved.iterdir()) == ["latest", "step_000001", "step_000007"]
