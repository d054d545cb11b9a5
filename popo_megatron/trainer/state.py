"""Everything a training run holds, how it is built, and how it is checkpointed and resumed.

A training checkpoint is a popo checkpoint directory (convert/checkpoint_dir.py) of kind "train":

    OUTPUT_DIR/checkpoints/step_000010/
      popo_checkpoint.json  layout, weight sets (model, twin)
      hf/                   the model's config and tokenizer files
      megatron/             distributed checkpoint: model., twin., optimizer (canonical per-parameter form,
                            so it reloads at another TP / PP / DP), predictor.
      trainer_state.json    step, prompt sampler, twin momentum, LR schedule, the run's config
      predictor_optimizer.pt, rng/rank_N.pt
    OUTPUT_DIR/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete;
`latest` is replaced (atomically) only after that, so a crash while writing
leaves the previous checkpoint as `latest`. The oldest are removed beyond
`train.keep_last`. Weights, exported by `popo convert mcore-to-hf`, work
from any of them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from popo_megatron.algo.drift import SimilarityBeta, TwinMomentum
from popo_megatron.algo.predictor import SimilarityPredictor, build_predictor_optimizer
from popo_megatron.algo.step import LossSettings
from popo_megatron.algo.twin import TwinParams
from popo_megatron.config.schema import Algorithm, Predictor
from popo_megatron.convert.checkpoint_dir import (
    HF_DIR,
    MEGATRON_DIR,
    CheckpointError,
    atomic_directory,
    copy_hf_files,
    read_checkpoint,
    write_info,
)
from popo_megatron.convert.model_checkpoint import check_loadable, layout_info, weights_sharded_state_dict, with_data
from popo_megatron.data.problems import ProblemSet, load_dataset
from popo_megatron.data.sampler import PromptSampler
from popo_megatron.logs import get_logger
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.platform import capture_rng_state, restore_rng_state
from popo_megatron.platform.signals import stop_signals_held
from popo_megatron.trainer.checkpoints import CHECKPOINTS, LATEST, TRAINER_STATE, plan_resume, read_trainer_state

# The distributed optimiser's state in canonical per-parameter form: a checkpoint reloads at any layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
log = get_logger("trainer")
_TWIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainState:
    cfg: DictConfig
    args: HFModelArgs
    ddp: Any
    optimizer: Any
    scheduler: Any
    settings: LossSettings
    problems: ProblemSet
    sampler: PromptSampler
    tokenizer: Any
    pad_id: int
    verifier: Any
    engine: Any
    momentum: TwinMomentum
    beta: SimilarityBeta
    twin: TwinParams | None = None
    reference: TwinParams | None = None  # GRPO's frozen initial policy (KL)
    predictor: SimilarityPredictor | None = None
    predictor_optimizer: Any = None
    step: int = 0
    closed: bool = field(default=False, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.ddp.module

    @property
    def uses_predictor(self) -> bool:
        """The run trains a linear predictor (it lives on the last pipeline stage; every rank knows)."""
        return self.settings.uses_twin_hidden and self.cfg.popo.similarity.predictor == Predictor.linear

    def follow_lr_schedule(self) -> None:
        """Give the predictor the policy's schedule (warm-up, decay) at its own peak rate:
        predictor_lr x lr / optim.lr (call after every scheduler step)."""
        if self.predictor_optimizer is None:
            return
        scale = self.optimizer.param_groups[0]["lr"] / self.cfg.optim.lr if self.cfg.optim.lr > 0 else 1.0
        for group in self.predictor_optimizer.param_groups:
            group["lr"] = self.cfg.popo.similarity.predictor_lr * scale

    def sync_weights(self) -> None:
        """Stream the trainer's weights into the rollout engine (collective)."""
        from popo_megatron.convert.weight_stream import iter_hf_weights

        bucket = self.cfg.train.weight_sync_bucket_mb * 2**20
        self.engine.wake()
        self.engine.update_weights(iter_hf_weights(self.ddp, self.args, self.cfg, bucket_bytes=bucket))

    # --- checkpoints -----------------------------------------------------------------------
    def _sharded_state(self, loading: bool) -> dict:
        model = weights_sharded_state_dict(self.model)
        optimizer = self.optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_METADATA)
        state = {"model": model, "optimizer": optimizer}
        if self.twin is not None:
            if loading:  # read the twin in its own dtype, whatever the model's
                layout = weights_sharded_state_dict(self.model, "twin")
                dtype = self.twin.dtype
                state["twin"] = {k: with_data(v, torch.empty_like(v.data, dtype=dtype)) for k, v in layout.items()}
            else:
                state["twin"] = self.twin.sharded_state_dict()
        if self.predictor is not None:
            state["predictor"] = self.predictor.sharded_state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Write the whole training state under OUTPUT_DIR/checkpoints and point `latest` at it (collective)."""
        from megatron.core import dist_checkpointing

        root = Path(self.cfg.train.output_dir) / CHECKPOINTS
        name = f"step_{self.step:06d}"
        _materialise_optimizer_state(self.optimizer)
        rank = dist.get_rank() if dist.is_initialized() else 0
        sharded = self._sharded_state(loading=False)
        weights = ["model"] + (["twin"] if self.twin is not None else [])
        # A stop signal during the save must not kill the processes the checkpoint writer starts.
        with stop_signals_held(), atomic_directory(root / name) as tmp:
            if rank == 0:
                (tmp / MEGATRON_DIR).mkdir()
                (tmp / "rng").mkdir()
                copy_hf_files(Path(self.cfg.model.hf_path), tmp / HF_DIR)
                write_info(tmp, layout_info(self.args, self.cfg, kind="train", weights=weights))
                (tmp / TRAINER_STATE).write_text(json.dumps(self._trainer_state(), indent=1) + "\n")
            _barrier()
            dist_checkpointing.save(sharded, str(tmp / MEGATRON_DIR))
            torch.save(capture_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
            if self.predictor is not None and self.predictor.is_main_replica():
                torch.save(self.predictor_optimizer.state_dict(), tmp / "predictor_optimizer.pt")
        if rank == 0:
            _write_latest(root, name)
            _remove_old(root, self.cfg.train.keep_last)
        _barrier()
        return root / name

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "momentum": self.momentum.state_dict(),
            "beta": self.beta.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore the training state from `ckpt`, saved at this or another layout (collective)."""
        from megatron.core import dist_checkpointing

        info, ckpt_args = read_checkpoint(ckpt)
        if info.kind != "train":
            raise CheckpointError(f"{ckpt}: a {info.kind!r} checkpoint, not a training checkpoint")
        check_loadable(info, ckpt_args, self.args, self.cfg, ckpt)
        if (self.twin is not None) != ("twin" in info.weights):
            raise CheckpointError(
                f"{ckpt}: {'has no' if self.twin is not None else 'has a'} twin, but popo.twin.enabled="
                f"{self.twin is not None} here"
            )
        _materialise_optimizer_state(self.optimizer)
        loaded = dist_checkpointing.load(self._sharded_state(loading=True), str(ckpt / MEGATRON_DIR))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in loaded["model"].items():
                params[name.removeprefix("model.")].copy_(tensor)
        configured = [(group.get("max_lr"), group.get("min_lr")) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(loaded["optimizer"])
        # The loaded groups carry the saved run's max_lr / min_lr, which the LR schedule reads before its
        # own: the config's win, as for the schedule itself (model/training.py, build_scheduler).
        for group, (max_lr, min_lr) in zip(self.optimizer.param_groups, configured, strict=True):
            if max_lr is not None:
                group["max_lr"], group["min_lr"] = max_lr, min_lr
        if self.twin is not None:
            self.twin.load_full_tensors({k.removeprefix("twin."): v for k, v in loaded["twin"].items()})
        if self.predictor is not None:
            with torch.no_grad():
                for name, param in self.predictor.named_parameters():
                    param.copy_(loaded["predictor"][f"predictor.{name}"])
            self.predictor_optimizer.load_state_dict(torch.load(ckpt / "predictor_optimizer.pt", weights_only=True))
        state = read_trainer_state(ckpt)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.momentum.load_state_dict(state["momentum"])
        if "beta" in state:  # checkpoints from before the adaptive beta keep the configured one
            self.beta.load_state_dict(state["beta"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.follow_lr_schedule()
        rng = ckpt / "rng" / f"rank_{dist.get_rank() if dist.is_initialized() else 0}.pt"
        if rng.is_file():  # another layout may have more ranks than the one that saved
            restore_rng_state(torch.load(rng, weights_only=True))

    def close(self) -> None:
        if not self.closed:
            self.verifier.close()
            self.engine.shutdown()
            self.closed = True


def _materialise_optimizer_state(optimizer: Any) -> None:
    """Give every parameter the Adam state a fresh optimiser would have before its first step.

    Megatron's optimisers describe their checkpoint from their current state, which torch's Adam creates
    lazily at the first step; without Apex or Transformer Engine (CPU) the distributed optimiser fails
    on an empty state, when saving before any update (a run whose first steps had no positive) and when
    loading. A step with zero gradients at learning rate 0 creates the state without moving any weight,
    and its step count is set back to 0.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        missing = [p for g in inner.param_groups for p in g["params"] if p not in inner.state]
        if not missing:
            continue
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
        for param in missing:
            param.grad = torch.zeros_like(param)
        inner.step()
        for group, rate in zip(inner.param_groups, rates, strict=True):
            group["lr"] = rate
        for param in missing:
            param.grad = None
            inner.state[param]["step"].zero_()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _remove_old(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old)


def build_train_state(cfg: DictConfig) -> TrainState:
    """Model, optimiser, twin, data, verifier and engine for `cfg`, resumed from OUTPUT_DIR when asked."""
    from megatron.core.parallel_state import is_pipeline_last_stage
    from transformers import AutoTokenizer

    from popo_megatron.config import validate_config
    from popo_megatron.convert import load_hf_weights
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.training import build_optimizer, build_scheduler, wrap_ddp
    from popo_megatron.platform import init_distributed, init_model_parallel, seed_everything
    from popo_megatron.reward.math_verifier import MathVerifier
    from popo_megatron.rollout.vllm_engine import vllm_engine

    world = init_distributed().world_size
    args = read_hf_config(cfg.model.hf_path)
    validate_config(cfg, world, args)
    init_model_parallel(cfg.parallel)
    seed_everything(cfg.seed)
    model = build_gpt_model(args, cfg)
    load_hf_weights(model, cfg.model.hf_path, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    optimizer = build_optimizer(ddp, cfg)
    total_updates = cfg.train.steps * cfg.train.mini_batches
    scheduler = build_scheduler(optimizer, cfg, total_updates)
    popo = Algorithm(cfg.algorithm) == Algorithm.popo
    twin_cfg = cfg.popo.twin
    twin = None
    if popo and twin_cfg.enabled:
        twin = TwinParams(ddp, _TWIN_DTYPES[twin_cfg.dtype.value], twin_cfg.cpu_offload)
    reference = TwinParams(ddp) if not popo and cfg.grpo.kl_beta > 0 else None
    beta = SimilarityBeta(cfg.popo.similarity, twin_cfg.momentum.d_target)
    settings = LossSettings.from_config(cfg, args.vocab_size, temperature=cfg.rollout.temperature)
    if twin is not None:  # the penalty's weight as the adaptive controller starts it (within its bounds)
        settings = replace(settings, similarity_beta=beta.value)
    predictor = predictor_optimizer = None
    if settings.uses_twin_hidden and cfg.popo.similarity.predictor == Predictor.linear:
        if is_pipeline_last_stage():
            predictor = SimilarityPredictor(args.hidden_size, cfg.parallel.sequence_parallel)
            predictor_optimizer = build_predictor_optimizer(predictor, cfg)
    problems = load_dataset(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code)
    state = TrainState(
        cfg=cfg,
        args=args,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        settings=settings,
        problems=problems,
        sampler=PromptSampler(len(problems), cfg.data.shuffle_seed),
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        verifier=MathVerifier(cfg.reward),
        engine=vllm_engine(cfg, cfg.model.hf_path),
        momentum=TwinMomentum(twin_cfg.momentum, total_updates),
        beta=beta,
        twin=twin,
        reference=reference,
        predictor=predictor,
        predictor_optimizer=predictor_optimizer,
    )
    state.follow_lr_schedule()
    resume = plan_resume(cfg)
    if resume is not None:
        state.load_checkpoint(resume.checkpoint)
        state.sync_weights()  # the engine started from model.hf_path's weights
        if dist.get_rank() == 0:
            changed = "".join(f"\n  changed: {change}" for change in resume.changes)
            log.info(f"resumed from {resume.checkpoint} at step {state.step}/{cfg.train.steps}{changed}")
    return state
