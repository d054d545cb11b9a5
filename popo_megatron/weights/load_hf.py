"""Load HF weights into a live (TP/PP-sharded) Megatron model, in memory.

Each rank reads only the slices of the HF tensors that its own parameters
hold: no rank materialises the full checkpoint.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from omegaconf import DictConfig

from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.platform import resolve_layer_spec
from popo_megatron.weights.hf_checkpoint import HFCheckpoint
from popo_megatron.weights.mapping import MappingError, ResolvedMapping, ShardContext, Sliceable, WeightMap, check_fits


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def weight_map_for(args: HFModelArgs, cfg: DictConfig) -> WeightMap:
    return WeightMap(args, resolve_layer_spec(cfg.model.spec))


def shard_context(args: HFModelArgs, cfg: DictConfig) -> ShardContext:
    from megatron.core import parallel_state

    return ShardContext.create(
        args,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
    )


class _InMemory:
    """A dict of full tensors behaving like a checkpoint (tests, weight streams)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def get(self, name: str) -> Sliceable:
        if name not in self._tensors:
            raise MappingError(f"tensor {name!r} not found")
        return self._tensors[name]


def _parameter_sources(
    model: torch.nn.Module, source: str | HFCheckpoint | Mapping[str, torch.Tensor], args: HFModelArgs, cfg: DictConfig
) -> Iterator[tuple[str, torch.nn.Parameter, ResolvedMapping, list[Sliceable], ShardContext]]:
    """(name, parameter, its mapping, the HF tensors it is made of, this rank's context) for every parameter
    of `model`; the HF tensors are views of the checkpoint (nothing is read yet)."""
    if isinstance(source, Mapping):
        reader = _InMemory(source)
    else:
        reader = source if isinstance(source, HFCheckpoint) else HFCheckpoint(source)
    weight_map = weight_map_for(args, cfg)
    ctx = shard_context(args, cfg)
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        mapping = weight_map.resolve(name, offset)
        yield name, param, mapping, [reader.get(h) for h in mapping.hf], ctx


def _wrong_model(name: str, mapping: ResolvedMapping, exc: MappingError) -> MappingError:
    return MappingError(f"{name} (from {', '.join(mapping.hf)}): {exc}: is the checkpoint from another model?")


def iter_megatron_shards(
    model: torch.nn.Module, source: HFCheckpoint | Mapping[str, torch.Tensor], args: HFModelArgs, cfg: DictConfig
) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, this rank's shard built from the HF tensors) for every
    parameter of `model`, one at a time so memory stays bounded by one tensor."""
    for name, param, mapping, hf, ctx in _parameter_sources(model, source, args, cfg):
        shard = mapping.transform.read_shard(hf, ctx)
        try:
            check_fits(shard.shape, param)
        except MappingError as exc:
            raise _wrong_model(name, mapping, exc) from None
        yield name, param, shard


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, source: str | Mapping[str, torch.Tensor], args: HFModelArgs, cfg: DictConfig
) -> None:
    """Copy the HF tensors of `source` (a checkpoint directory, or full tensors by name) into this rank's
    parameters (cast to their dtype): each rank reads its slices of them only, straight into the parameter."""
    for name, param, mapping, hf, ctx in _parameter_sources(model, source, args, cfg):
        try:
            mapping.transform.read_shard_into(hf, ctx, param.data)
        except MappingError as exc:
            raise _wrong_model(name, mapping, exc) from None


def load_hf_model(cfg: DictConfig, parallel_output: bool = True) -> tuple[torch.nn.Module, HFModelArgs]:
    """Build this rank's model stage for `cfg.model.hf_path` and load its weights."""
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config

    args = read_hf_config(cfg.model.hf_path)
    model = build_gpt_model(args, cfg, parallel_output=parallel_output)
    load_hf_weights(model, cfg.model.hf_path, args, cfg)
    return model, args
