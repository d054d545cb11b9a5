"""The live Megatron model's weights as full HF-named tensors, for a rollout engine.

Every rank receives every tensor, as an engine replica needs (vLLM re-shards
full HF tensors itself): each pipeline stage all-gathers its TP shards inside
the TP group, the gathered shards are broadcast to the other stages of the
pipeline group, and the mapping table's `to_hf` turns them into HF tensors
(the same code the exporter uses). Parameters travel in buckets of about
`bucket_bytes`, one all-gather and one broadcast per bucket.

The plan (which parameter lives on which stage, with what shape) is rebuilt
from the model on every call: a cached plan can silently send stale or
misplaced weights after the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.model.forward import unwrap_model
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.weights.load_hf import layer_offset, shard_context, weight_map_for


@dataclass(frozen=True)
class _Entry:
    stage: int
    local_name: str  # the parameter's name on its own stage
    global_name: str  # Megatron name with the global layer index
    shape: tuple[int, ...]  # this TP rank's shard
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


def _plan(model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig) -> list[_Entry]:
    from megatron.core import parallel_state

    weight_map = weight_map_for(args, cfg)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    offset = layer_offset(model)
    mine = []
    for name, param in model.named_parameters():
        mapping = weight_map.resolve(name, offset)
        if not mapping.duplicate:
            mine.append(_Entry(stage, name, mapping.megatron, tuple(param.shape), param.dtype))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return mine
    stages: list[list[_Entry]] = [[] for _ in range(parallel_state.get_pipeline_model_parallel_world_size())]
    dist.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
    return [entry for entries in stages for entry in entries]


def _buckets(entries: list[_Entry], tp: int, bucket_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries of one stage and dtype, up to bucket_bytes of gathered data each."""
    buckets: list[list[_Entry]] = []
    size = 0
    for entry in entries:
        nbytes = entry.numel * tp * entry.dtype.itemsize
        last = buckets[-1] if buckets else None
        if last is None or (last[0].stage, last[0].dtype) != (entry.stage, entry.dtype) or size + nbytes > bucket_bytes:
            buckets.append([entry])
            size = nbytes
        else:
            last.append(entry)
            size += nbytes
    return buckets


def iter_hf_weight_buckets(
    model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig, bucket_bytes: int = 256 * 1024**2
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor) covering every weight of the model once.

    Collective over the model-parallel groups: every rank must consume the
    iterator to the end. Tensors of a bucket may share one buffer, which the
    next bucket reuses: copy them if they must outlive it.
    """
    from megatron.core import parallel_state

    model = unwrap_model(model)
    weight_map = weight_map_for(args, cfg)
    ctx = shard_context(args, cfg)
    tp = ctx.tp_size
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    buckets = _buckets(_plan(model, args, cfg), tp, bucket_bytes)
    # One gathered and one local buffer per dtype, of the largest bucket, reused by every bucket: fresh
    # buffers would pay their page faults (CPU) or allocations again for each bucket.
    largest: dict[torch.dtype, int] = {}
    for bucket in buckets:
        largest[bucket[0].dtype] = max(largest.get(bucket[0].dtype, 0), sum(e.numel for e in bucket))
    gathered_buffers = {dtype: torch.empty(tp * n, dtype=dtype, device=device) for dtype, n in largest.items()}
    local_buffers = {dtype: torch.empty(n, dtype=dtype, device=device) for dtype, n in largest.items() if tp > 1}
    for bucket in buckets:
        stage, dtype = bucket[0].stage, bucket[0].dtype
        local_numel = sum(e.numel for e in bucket)
        gathered = gathered_buffers[dtype][: tp * local_numel]
        if stage == my_stage:
            local = [params[e.local_name].detach().reshape(-1) for e in bucket]
            if tp > 1:
                flat = torch.cat(local, out=local_buffers[dtype][:local_numel])
                dist.all_gather_into_tensor(gathered, flat, group=parallel_state.get_tensor_model_parallel_group())
            else:
                torch.cat(local, out=gathered)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(gathered, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        per_rank = gathered.view(tp, local_numel)
        out = []
        start = 0
        for e in bucket:
            shards = [per_rank[r, start : start + e.numel].view(e.shape) for r in range(tp)]
            start += e.numel
            mapping = weight_map.resolve(e.global_name)
            out += zip(mapping.hf, mapping.transform.to_hf(shards, ctx), strict=True)
        yield out


def iter_hf_weights(
    model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig, bucket_bytes: int = 256 * 1024**2
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) one at a time, moved in buckets (see iter_hf_weight_buckets)."""
    for bucket in iter_hf_weight_buckets(model, args, cfg, bucket_bytes):
        yield from bucket
