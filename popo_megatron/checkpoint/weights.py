"""A live (TP/PP-sharded) Megatron model's weights in a popo checkpoint: what to save, what to load.

Collective: every rank of the model-parallel world calls these together.
Loading works at any TP/PP whose vocab padding and query-group count match
the checkpoint's; anything else fails with a message naming the difference
(and `popo convert mcore-reshard` as the fix) before any weight is touched.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from popo_megatron.algo.twin import TwinParams
from popo_megatron.checkpoint.format import (
    MEGATRON_DIR,
    WEIGHT_PREFIXES,
    CheckpointError,
    CheckpointInfo,
    read_checkpoint,
)
from popo_megatron.config.schema import setting_value
from popo_megatron.model.forward import unwrap_model
from popo_megatron.model.hf_config import HFModelArgs


def weights_sharded_state_dict(model: torch.nn.Module, weight_set: str = "model") -> dict:
    """The model's parameters as Megatron ShardedTensors under the weight set's key prefix."""
    sharded = model.sharded_state_dict(prefix=WEIGHT_PREFIXES[weight_set])
    # Extra states (Transformer Engine's FP8 scaling metadata; empty for local modules) are not weights.
    return {name: value for name, value in sharded.items() if not name.endswith("_extra_state")}


def with_data(sharded, data: torch.Tensor):
    """A model ShardedTensor (or ShardedTensorFactory, e.g. the gated MLP at TP > 1) describing `data` instead of
    the parameter: same key and layout, `data`'s values and dtype."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if isinstance(sharded, ShardedTensor):
        return replace(sharded, data=data, dtype=data.dtype)
    return replace(sharded, data=data)  # a factory builds its ShardedTensors from the data


def layout_info(args: HFModelArgs, cfg: DictConfig, kind: str, weights: list[str]) -> CheckpointInfo:
    """The CheckpointInfo of a model built from `args` at `cfg`'s layout."""
    return CheckpointInfo.for_layout(
        args,
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        divisible_by=cfg.model.make_vocab_size_divisible_by,
        dtype=setting_value(cfg.model.params_dtype),
        kind=kind,
        weights=weights,
    )


def check_loadable(info: CheckpointInfo, ckpt_args: HFModelArgs, args: HFModelArgs, cfg: DictConfig, where: Path):
    """Raise CheckpointError unless a checkpoint with `info` loads into a model of `args` at `cfg`'s layout."""
    if ckpt_args != args:
        mine, theirs = asdict(args), asdict(ckpt_args)
        diff = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs model {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise CheckpointError(f"{where}: the checkpoint is of another model ({diff})")
    want = layout_info(args, cfg, info.kind, info.weights)
    for field_name, what in (("padded_vocab_size", "padded vocabulary"), ("query_groups", "query groups (KV heads)")):
        saved, needed = getattr(info, field_name), getattr(want, field_name)
        if saved != needed:
            raise CheckpointError(
                f"{where}: saved with {saved} {what}, but TP={want.tensor_model_parallel_size} needs {needed}; "
                f"rewrite it for this layout with `popo convert mcore-reshard --ckpt {where} --out NEW_DIR "
                f"--tp {want.tensor_model_parallel_size} --pp {want.pipeline_model_parallel_size}`"
            )


def weights_request(model: torch.nn.Module, weight_set: str = "model", dtype: torch.dtype | None = None) -> dict:
    """What to load for a weight set: the model's layout; without `dtype` it is read into the parameters
    themselves, with it into new tensors of that dtype (the twin's, whatever the model's)."""
    request = weights_sharded_state_dict(model, weight_set)
    if dtype is not None:
        request = {key: with_data(sh, torch.empty_like(sh.data, dtype=dtype)) for key, sh in request.items()}
    return request


def twin_sharded_state(twin: TwinParams) -> dict:
    """The twin as ShardedTensors under `twin.`, keyed like the model's weights; stored in the twin's dtype.
    Collective over data-parallel ranks when the twin is sliced."""
    tensors = twin.full_tensors()
    layout = weights_sharded_state_dict(unwrap_model(twin.model), "twin")
    return {key: with_data(sh, tensors[key.removeprefix("twin.")]) for key, sh in layout.items()}


def load_checkpoint_state(
    ckpt: str | Path, request: dict, args: HFModelArgs, cfg: DictConfig, kind: str | None = None
) -> tuple[dict, CheckpointInfo]:
    """The one way a checkpoint is read into a live model (collective): check the directory, the model and
    the layout, and that it holds the requested weight sets (top-level keys of `request` that name one),
    then load `request` from megatron/."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    info, ckpt_args = read_checkpoint(ckpt)
    if kind is not None and info.kind != kind:
        raise CheckpointError(f"{ckpt}: a {info.kind!r} checkpoint, not a {kind!r} one")
    check_loadable(info, ckpt_args, args, cfg, ckpt)
    info.require([weight_set for weight_set in WEIGHT_PREFIXES if weight_set in request], ckpt)
    return dist_checkpointing.load(request, str(ckpt / MEGATRON_DIR)), info


def unprefixed(loaded: dict, weight_set: str) -> dict[str, torch.Tensor]:
    """A loaded weight set keyed by the model's parameter names."""
    prefix = WEIGHT_PREFIXES[weight_set]
    return {name.removeprefix(prefix): tensor for name, tensor in loaded.items()}
