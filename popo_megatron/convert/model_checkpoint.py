"""Save and load a live (TP/PP-sharded) Megatron model's weights as a popo checkpoint.

Collective: every rank of the model-parallel world calls these together.
Loading works at any TP/PP whose vocab padding and query-group count match
the checkpoint's; anything else fails with a message naming the difference
(and `popo convert mcore-reshard` as the fix) before any weight is touched.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.convert.checkpoint_dir import (
    HF_DIR,
    MEGATRON_DIR,
    WEIGHT_PREFIXES,
    CheckpointError,
    CheckpointInfo,
    atomic_directory,
    copy_hf_files,
    read_checkpoint,
    write_info,
)
from popo_megatron.model.hf_config import HFModelArgs

if TYPE_CHECKING:
    from popo_megatron.algo.twin import TwinParams


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
    dtype = cfg.model.params_dtype
    return CheckpointInfo.for_layout(
        args,
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        divisible_by=cfg.model.make_vocab_size_divisible_by,
        dtype=getattr(dtype, "value", str(dtype)),
        kind=kind,
        weights=weights,
    )


def save_model_weights(
    model: torch.nn.Module,
    out: str | Path,
    args: HFModelArgs,
    cfg: DictConfig,
    hf_dir: str | Path,
    twin: TwinParams | None = None,
) -> None:
    """Write the model's weights (and the twin's, if given) as a checkpoint at `out`
    (config/tokenizer files taken from `hf_dir`)."""
    from megatron.core import dist_checkpointing

    sharded = weights_sharded_state_dict(model)
    weights = ["model"]
    if twin is not None:
        sharded.update(twin.sharded_state_dict())
        weights.append("twin")
    with atomic_directory(out) as tmp:
        if not dist.is_initialized() or dist.get_rank() == 0:
            (tmp / MEGATRON_DIR).mkdir()
            copy_hf_files(Path(hf_dir), tmp / HF_DIR)
            write_info(tmp, layout_info(args, cfg, kind="weights", weights=weights))
        if dist.is_initialized():
            dist.barrier()
        dist_checkpointing.save(sharded, str(tmp / MEGATRON_DIR))


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


def read_weight_set(
    model: torch.nn.Module,
    ckpt: str | Path,
    args: HFModelArgs,
    cfg: DictConfig,
    weight_set: str = "model",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A checkpoint's policy (or twin) weights as this rank's shards, keyed by the model's parameter names.

    Without `dtype` they are read into the model's parameters themselves; with it, into new tensors of that dtype.
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    info, ckpt_args = read_checkpoint(ckpt)
    check_loadable(info, ckpt_args, args, cfg, ckpt)
    if weight_set not in info.weights:
        raise CheckpointError(f"{ckpt}: has no {weight_set!r} weights (it holds: {', '.join(info.weights)})")
    request = weights_sharded_state_dict(model, weight_set)
    if dtype is not None:
        request = {key: with_data(sh, torch.empty_like(sh.data, dtype=dtype)) for key, sh in request.items()}
    loaded = dist_checkpointing.load(request, str(ckpt / MEGATRON_DIR))
    prefix = WEIGHT_PREFIXES[weight_set]
    return {name.removeprefix(prefix): tensor for name, tensor in loaded.items()}


@torch.no_grad()
def load_model_weights(
    model: torch.nn.Module, ckpt: str | Path, args: HFModelArgs, cfg: DictConfig, weight_set: str = "model"
) -> None:
    """Load a checkpoint's policy (or twin) weights into this rank's parameters."""
    params = dict(model.named_parameters())
    for name, tensor in read_weight_set(model, ckpt, args, cfg, weight_set).items():
        params[name].copy_(tensor)  # a no-op where the loader filled the parameter in place


def load_twin_weights(twin: TwinParams, ckpt: str | Path, args: HFModelArgs, cfg: DictConfig) -> None:
    """Set the twin from a checkpoint's `twin` weights (saved at this or any other layout), in the twin's dtype."""
    from popo_megatron.model.forward import unwrap_model

    twin.load_full_tensors(read_weight_set(unwrap_model(twin.model), ckpt, args, cfg, "twin", dtype=twin.dtype))
