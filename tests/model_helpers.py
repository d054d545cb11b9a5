"""Helpers for tests that build a Megatron model inside a local world (see popo_megatron.launch)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Change every weight by an elementwise function of its value, so that copies of a
    weight (TP-replicated norms, the tied output layer on the last stage) stay equal,
    as they do after a real optimiser step."""
    for param in model.parameters():
        param.add_(scale * torch.sin(param * 997.0))


def config_for(hf: Path, tp: int, pp: int, sequence_parallel: bool = False, overrides: tuple[str, ...] = ()):
    from popo_megatron.config import load_config

    return load_config(
        overrides=[
            f"model.hf_path={hf}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.sequence_parallel={sequence_parallel}",
            *overrides,
        ]
    )


def build_model(hf: Path, tp: int, pp: int, sequence_parallel: bool = False, overrides: tuple[str, ...] = ()):
    """This rank's model stage at the layout (uninitialised weights), its HF args and config."""
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.platform import init_model_parallel, seed_everything

    cfg = config_for(hf, tp, pp, sequence_parallel, overrides)
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    args = read_hf_config(hf)
    return build_gpt_model(args, cfg), args, cfg


def save_model_weights(model, out: Path, args, cfg, hf_dir: Path, twin=None) -> None:
    """Write the model's weights (and the twin's) as a "weights" checkpoint at `out`, the way the trainer
    writes its own (checkpoint_directory + dist_checkpointing.save)."""
    from megatron.core import dist_checkpointing

    from popo_megatron.checkpoint.format import MEGATRON_DIR, checkpoint_directory
    from popo_megatron.checkpoint.weights import layout_info, twin_sharded_state, weights_sharded_state_dict

    sharded = weights_sharded_state_dict(model)
    weights = ["model"]
    if twin is not None:
        sharded.update(twin_sharded_state(twin))
        weights.append("twin")
    with checkpoint_directory(out, hf_dir, layout_info(args, cfg, kind="weights", weights=weights)) as tmp:
        dist_checkpointing.save(sharded, str(tmp / MEGATRON_DIR))


@torch.no_grad()
def load_model_weights(model, ckpt: Path, args, cfg) -> None:
    """Load a checkpoint's policy weights into this rank's parameters through the package's load path."""
    from popo_megatron.checkpoint.weights import load_checkpoint_state, unprefixed, weights_request

    loaded, _ = load_checkpoint_state(ckpt, {"model": weights_request(model)}, args, cfg)
    params = dict(model.named_parameters())
    for name, tensor in unprefixed(loaded["model"], "model").items():
        params[name].copy_(tensor)  # a no-op where the loader filled the parameter in place


def load_twin_weights(twin, ckpt: Path, args, cfg) -> None:
    """Set the twin from a checkpoint's `twin` weights (saved at this or any other layout), in its dtype."""
    from popo_megatron.checkpoint.weights import load_checkpoint_state, unprefixed, weights_request
    from popo_megatron.model.forward import unwrap_model

    request = {"twin": weights_request(unwrap_model(twin.model), "twin", dtype=twin.dtype)}
    loaded, _ = load_checkpoint_state(ckpt, request, args, cfg)
    twin.load_full_tensors(unprefixed(loaded["twin"], "twin"))


def objective_without_model(cfg, group_size: int = 4):
    """The config's objective for tests of its row rules (no EMA target or reference: popo.alpha and
    grpo.kl_beta must be 0, or their copy of the policy would need a model)."""
    from popo_megatron.objectives import ObjectiveContext, build_objective

    context = ObjectiveContext(
        cfg.loss, cfg.optim, 1000, 64, cfg.rollout.temperature, cfg.seed, 1, group_size, cfg.train.mini_batches, False
    )
    return build_objective(cfg, context, model=None)
