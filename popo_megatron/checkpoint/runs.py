"""A run's checkpoints on disk: their names, the newest one, the one a run resumes from, and what the
resumed run's config changes against the config the checkpoint was saved with.

    OUTPUT_DIR/checkpoints/step_000010/trainer_state.json   step, sampler, ..., the run's config
    OUTPUT_DIR/checkpoints/latest                           the name of the newest complete checkpoint

A resumed run continues the saved one: its weights, optimiser, twin, prompt sampler and schedules. Most
settings may change on the way (a learning rate, a sampling temperature, more steps) and the change is
reported; the keys in FIXED define what the saved state *is*, and changing them is refused. What a
training checkpoint holds, and how it is written and read, is checkpoint/training.py's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from popo_megatron.checkpoint.durable import fsync_dir, remove_leftovers, remove_tree, write_text_durably
from popo_megatron.checkpoint.format import HF_DIR, CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SUPERSEDED = "superseded"  # checkpoints of an earlier history of the run directory, set aside (never deleted)
TRAINER_STATE = "trainer_state.json"

_DATA_SET = "the prompt sampler's position is a position in the data set and order the run was saved with"
# Keys (or key prefixes) a resumed run may not change, and why.
FIXED = {
    "model.hf_path": "the checkpoint's weights were trained from another model",
    "algorithm": "the optimiser state, twin and metrics belong to the algorithm the run was saved with",
    "data.train": _DATA_SET,
    "data.problem_key": _DATA_SET,
    "data.answer_key": _DATA_SET,
    "data.solution_key": _DATA_SET,
    "data.synthetic": _DATA_SET,
    "data.shuffle_seed": _DATA_SET,
    "rollout.n": "the group size G defines the run's groups and POPO's redistribution weights",
    "seed": "the run's random streams (rollout seeds, a generated model, the predictor) follow from it",
    "popo.similarity": "the checkpoint's predictor head belongs to the similarity form it was saved with",
    "popo.predictor.hidden": "the checkpoint's predictor head has that width",
    "popo.predictor.layers": "the checkpoint's predictor head has that depth",
    "popo.per_token.predictor": "the checkpoint has a linear predictor, or has none",
}
# Where a run is stored and how it is started: not part of what it computes.
NOT_COMPARED = ("train.output_dir", "train.resume", "train.resume_from")


class ResumeError(CheckpointError):
    """A resumed run's config changes a key the checkpoint's state depends on."""


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.new!r}"


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path
    step: int  # the step the checkpoint was saved after
    changes: list[Change]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    marker = Path(output_dir) / CHECKPOINTS / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if step_of(Path(name)) is None or Path(name).name != name:  # a checkpoint of this directory, by name
        raise CheckpointError(f"{marker} names {name[:100]!r}, not a checkpoint of {marker.parent} (step_N)")
    path = marker.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{marker} points to {path.name}, which does not exist")
    return path


def point_latest(root: Path, name: str) -> None:
    """Make `latest` name the checkpoint `name` (atomically and durably: a crash leaves the old or the new
    name)."""
    write_text_durably(root / LATEST, name + "\n")


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory `step_N`; None for anything else."""
    digits = path.name[len("step_") :]
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def run_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in a run's checkpoints/ directory, oldest step first."""
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def remove_old(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints by step, never the one `latest` names (each renamed out of
    sight first: a crash never leaves a half-deleted one under its own name)."""
    marker = root / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    steps = run_checkpoints(root)
    kept = {p.name for p in steps[-keep:]} | {named}
    for old in steps:
        if old.name not in kept:
            remove_tree(old)


def set_aside_later(output_dir: str | Path, step: int, resumed: Path | None) -> Path | None:
    """Begin at `step` in OUTPUT_DIR (0: a fresh run), resumed from checkpoint `resumed`: the checkpoints
    saved after `step` belong to another history (a rollback with train.resume_from, train.resume=false, a
    save whose `latest` never moved), so they are moved, not deleted, to checkpoints/superseded/TIME/ (with
    the `latest` that named one of them). No later save then collides with them, and `keep_last` never
    weighs them against this run's. Returns that directory, or None when nothing was moved. Rank 0 only,
    before the run's first save."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    remove_leftovers(root)
    later = [p for p in run_checkpoints(root) if step_of(p) > step]
    marker = root / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    moved_names = {p.name for p in later}
    in_root = resumed is not None and resumed.absolute().parent == root.absolute()
    stale_marker = named is not None and (named in moved_names or step == 0) and not in_root
    if not later and not stale_marker:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = root / SUPERSEDED / stamp
    for again in range(2, 1000):  # another set-aside in the same second
        if not dest.exists():
            break
        dest = root / SUPERSEDED / f"{stamp}-{again}"
    dest.mkdir(parents=True)
    for path in later:
        os.rename(path, dest / path.name)
    if in_root and named != resumed.name:
        point_latest(root, resumed.name)
    elif stale_marker:
        os.rename(marker, dest / LATEST)
    fsync_dir(root)
    return dest


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's output directory, its checkpoints/ directory or the `latest` marker -> the newest checkpoint
    (what a user means by them); any other path as it is."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return latest_checkpoint(path.parent.parent) or path
    for run_dir in (path, path.parent):
        if (run_dir / CHECKPOINTS / LATEST).is_file() and path in (run_dir, run_dir / CHECKPOINTS):
            return latest_checkpoint(run_dir) or path
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no {TRAINER_STATE}: not a training checkpoint of popo train")
    return json.loads(path.read_text())


def plan_resume(cfg: DictConfig) -> ResumePlan | None:
    """The checkpoint `cfg` resumes from (train.resume_from, else OUTPUT_DIR's newest when train.resume),
    the step it was saved after, and the settings `cfg` changes; None for a fresh run.
    Raises ResumeError naming every FIXED key that `cfg` changes."""
    if cfg.train.resume_from:
        checkpoint = Path(cfg.train.resume_from)
    elif cfg.train.resume:
        checkpoint = latest_checkpoint(cfg.train.output_dir)
    else:
        return None
    if checkpoint is None:
        return None
    state = read_trainer_state(checkpoint)
    saved = state.get("config")
    changes = (
        [] if saved is None else config_changes(saved, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    )
    refused = [c for c in changes if _refused(c, checkpoint)]
    if refused:
        lines = "; ".join(f"{c} ({_reason(c.key)})" for c in refused)
        raise ResumeError(
            f"{checkpoint} cannot continue with this config: {lines}. Start a new run instead: another "
            "train.output_dir, or train.resume=false (which sets this run's checkpoints aside in "
            "checkpoints/superseded/)"
        )
    return ResumePlan(checkpoint=checkpoint, step=int(state["step"]), changes=changes)


def config_changes(saved: dict, new: dict) -> list[Change]:
    """The keys (dotted) whose values differ, among those both configs have: a key added to the schema
    since the checkpoint was saved, or removed from it, is not a change the user made."""
    before, after = _flatten(saved), _flatten(new)
    keys = [k for k in after if k in before and not k.startswith(NOT_COMPARED)]
    return [Change(k, before[k], after[k]) for k in keys if before[k] != after[k]]


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _reason(key: str) -> str | None:
    return next((why for fixed, why in FIXED.items() if key == fixed or key.startswith(fixed + ".")), None)


def _refused(change: Change, checkpoint: Path) -> bool:
    if _reason(change.key) is None:
        return False
    if change.key == "model.hf_path":  # the same model moved to another path (another machine, cache)
        return _model_config(Path(change.new)) != _model_config(checkpoint / HF_DIR)
    return True


def _model_config(hf_dir: Path) -> dict | None:
    path = hf_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None
