"""A training checkpoint: everything a run needs to continue exactly, written and read collectively.

A training checkpoint is a popo checkpoint directory (checkpoint/format.py) of kind "train":

    OUTPUT_DIR/checkpoints/step_000010/
      popo_checkpoint.json  layout, weight sets (model, twin)
      hf/                   the model's config and tokenizer files
      megatron/             distributed checkpoint: model., twin., optimizer (canonical per-parameter form,
                            so it reloads at another TP / PP / DP), predictor.
      trainer_state.json    step, prompt sampler, the objective's state (momentum, alpha), LR schedule, the
                            run's config
      predictor_optimizer.pt, rng/rank_N.pt
    OUTPUT_DIR/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete; `latest` is replaced
(atomically) only after that, so a crash while writing leaves the previous checkpoint as `latest`. The
oldest are removed beyond `train.keep_last`. Weights, exported by `popo convert mcore-to-hf`, work from
any of them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.checkpoint.api import CheckpointException

from popo_megatron.algo.predictor import ReplicatedHead
from popo_megatron.algo.twin import TwinParams
from popo_megatron.checkpoint.durable import fsync_file
from popo_megatron.checkpoint.format import MEGATRON_DIR, CheckpointError, checkpoint_directory, read_checkpoint
from popo_megatron.checkpoint.runs import (
    CHECKPOINTS,
    TRAINER_STATE,
    latest_checkpoint,
    point_latest,
    read_trainer_state,
    remove_old,
)
from popo_megatron.checkpoint.weights import (
    layout_info,
    load_checkpoint_state,
    twin_sharded_state,
    unprefixed,
    weights_request,
    weights_sharded_state_dict,
)
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.platform import barrier, capture_rng_state, collective_device, global_rank, restore_rng_state
from popo_megatron.platform.optimizer_state import materialise_optimizer_state
from popo_megatron.platform.signals import stop_signals_held

# The distributed optimiser's state in canonical per-parameter form: a checkpoint reloads at any layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RNG_DIR = "rng"
PREDICTOR_OPTIMIZER = "predictor_optimizer.pt"


@dataclass
class Trained:
    """What a training checkpoint holds the weights and optimiser state of."""

    model: torch.nn.Module  # this rank's GPTModel stage (unwrapped)
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    twin: TwinParams | None  # the objective's checkpointed copy of the policy (POPO's EMA target)
    predictor: ReplicatedHead | None  # the objective's head, on the last pipeline stage
    predictor_optimizer: torch.optim.Optimizer | None


def _sharded_state(trained: Trained, loading: bool) -> dict:
    model = weights_sharded_state_dict(trained.model)
    optimizer = trained.optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_METADATA)
    state = {"model": model, "optimizer": optimizer}
    if trained.twin is not None:
        # loading: read the twin in its own dtype, whatever the model's
        twin = trained.twin
        state["twin"] = weights_request(trained.model, "twin", twin.dtype) if loading else twin_sharded_state(twin)
    if trained.predictor is not None:
        state["predictor"] = trained.predictor.sharded_state_dict()
    return state


def save_training_checkpoint(trained: Trained, trainer_state: dict, args: HFModelArgs, cfg: DictConfig) -> Path:
    """Write OUTPUT_DIR/checkpoints/step_N (N = trainer_state["step"]) and point `latest` at it (collective)."""
    from megatron.core import dist_checkpointing

    root = Path(cfg.train.output_dir) / CHECKPOINTS
    name = f"step_{trainer_state['step']:06d}"
    bad = non_finite_tensors(trained)  # collective
    if bad:
        raise CheckpointError(
            f"not saving {root / name}: {bad} weight tensor(s) hold NaN or inf (the run diverged); the last"
            f" checkpoint is {latest_checkpoint(cfg.train.output_dir) or 'none'}: resume from it with a lower"
            f" optim.lr (popo train CONFIG train.resume_from=PATH)"
        )
    materialise_optimizer_state(trained.optimizer)
    sharded = _sharded_state(trained, loading=False)
    weights = ["model"] + (["twin"] if trained.twin is not None else [])
    info = layout_info(args, cfg, kind="train", weights=weights)
    try:
        # A stop signal during the save must not kill the processes the checkpoint writer starts.
        with stop_signals_held(), checkpoint_directory(root / name, cfg.model.hf_path, info) as tmp:
            if global_rank() == 0:
                (tmp / RNG_DIR).mkdir()
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
            barrier()
            dist_checkpointing.save(sharded, str(tmp / MEGATRON_DIR))
            rng_file = tmp / RNG_DIR / f"rank_{global_rank()}.pt"
            torch.save(capture_rng_state(), rng_file)
            fsync_file(rng_file)  # by its writer: on a shared file system only it can flush its cache
            if trained.predictor is not None and trained.predictor.is_main_replica():
                torch.save(trained.predictor_optimizer.state_dict(), tmp / PREDICTOR_OPTIMIZER)
                fsync_file(tmp / PREDICTOR_OPTIMIZER)
    except (OSError, CheckpointException) as exc:  # a full disk, a quota, a file system gone
        raise CheckpointError(
            f"saving {root / name} failed ({_save_failure(exc, root)}); nothing of it was kept and the last"
            f" checkpoint is still {latest_checkpoint(cfg.train.output_dir) or 'none'}: free space (or fix the"
            " file system), then run the same command again to resume from it"
        ) from exc
    if global_rank() == 0:
        point_latest(root, name)
        remove_old(root, cfg.train.keep_last)
    barrier()
    return root / name


def _save_failure(exc: BaseException, root: Path) -> str:
    """What went wrong in a save, in one line: the first failing rank's own error (DCP gathers them into a
    CheckpointException whose text is every rank's traceback), and the space left where it was writing (a
    full disk often surfaces as a writer's short write, not as ENOSPC)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (exc, _) = next(iter(sorted(exc.failures.items(), key=lambda item: item[0])))
        where = f"rank {rank}: "
    else:
        where = ""
    what = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return f"{where}{what}{free}"


def non_finite_tensors(trained: Trained) -> int:
    """How many of the run's weight tensors (policy, twin, head) hold a NaN or inf on any rank (collective
    over the world; every rank gets the same count)."""
    tensors = list(trained.model.parameters())
    tensors += trained.twin.local_tensors() if trained.twin is not None else []
    tensors += list(trained.predictor.parameters()) if trained.predictor is not None else []
    device = collective_device()
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).sum().to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return int(bad)


def load_training_checkpoint(ckpt: Path, trained: Trained, args: HFModelArgs, cfg: DictConfig) -> dict:
    """Restore the weights, optimiser, twin, predictor and RNG of `ckpt`, saved at this or another layout
    (collective); returns its trainer state (step, sampler, schedules) for the caller to restore."""
    info, _ = read_checkpoint(ckpt)
    if (trained.twin is not None) != ("twin" in info.weights):
        if trained.twin is not None:
            why = "has no EMA target (it was saved with popo.alpha=0), but this run's similarity term needs one"
        else:
            why = "has an EMA target, but this run has none (popo.alpha=0 or another algorithm)"
        raise CheckpointError(f"{ckpt}: {why}; resume with the saved run's settings or start a new run")
    materialise_optimizer_state(trained.optimizer)
    loaded, _ = load_checkpoint_state(ckpt, _sharded_state(trained, loading=True), args, cfg, kind="train")
    params = dict(trained.model.named_parameters())
    with torch.no_grad():
        for name, tensor in unprefixed(loaded["model"], "model").items():
            params[name].copy_(tensor)
    optimizer = trained.optimizer
    configured = [(group.get("max_lr"), group.get("min_lr")) for group in optimizer.param_groups]
    optimizer.load_state_dict(loaded["optimizer"])
    # The loaded groups carry the saved run's max_lr / min_lr, which the LR schedule reads before its
    # own: the config's win, as for the schedule itself (model/training.py, build_scheduler).
    for group, (max_lr, min_lr) in zip(optimizer.param_groups, configured, strict=True):
        if max_lr is not None:
            group["max_lr"], group["min_lr"] = max_lr, min_lr
    if trained.twin is not None:
        trained.twin.load_full_tensors(unprefixed(loaded["twin"], "twin"))
    if trained.predictor is not None:
        with torch.no_grad():
            for name, param in trained.predictor.named_parameters():
                param.copy_(loaded["predictor"][f"predictor.{name}"])
        trained.predictor_optimizer.load_state_dict(torch.load(ckpt / PREDICTOR_OPTIMIZER, weights_only=True))
    rng = ckpt / RNG_DIR / f"rank_{global_rank()}.pt"
    if rng.is_file():  # another layout may have more ranks than the one that saved
        restore_rng_state(torch.load(rng, weights_only=True))
    return read_trainer_state(ckpt)
