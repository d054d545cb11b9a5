"""The live Megatron model's weights as full HF-named tensors, for a rollout engine.

Every rank receives every tensor, as an engine replica needs (vLLM re-shards
full HF tensors itself): each pipeline stage all-gathers its TP shards inside
the TP group, the gathered shards are broadcast to the other stages of the
pipeline group, and the mapping table's `to_hf` turns them into HF tensors
(the same code the exporter uses). Parameters travel in buckets of about
`bucket_bytes`: per bucket one all-gather over TP (on gloo, one in-place
broadcast from each TP rank: see gather_in_place) and one broadcast over PP.
A parameter larger than the bucket travels alone, and a dim-0-split one then
needs no re-layout at all (mapping.join_rows).

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


def _shares_memory(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def gather_in_place(per_rank: torch.Tensor, rank: int, group: dist.ProcessGroup) -> None:
    """Fill every row of `per_rank` ([group size, n], row `rank` already this rank's) with each rank's row.

    NCCL all-gathers in place. gloo's all-gather does not: it stages the whole output in a fresh flat
    tensor and copies it out, which on CPU means a page fault for every 4 KiB of every bucket; in-place
    broadcasts from each rank move the same bytes with neither (measured 1.4-5x faster at 16-256 MB
    buckets on 2 ranks, bench/bench_conversion.py).
    """
    if dist.get_backend(group) != "gloo":
        dist.all_gather_into_tensor(per_rank.view(-1), per_rank[rank], group=group)
        return
    for src in range(per_rank.shape[0]):
        dist.broadcast(per_rank[src], src=dist.get_global_rank(group, src), group=group)


def iter_hf_weight_buckets(
    model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig, bucket_bytes: int = 256 * 1024**2
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor) covering every weight of the model once.

    Collective over the model-parallel groups: every rank must consume the
    iterator to the end. The tensors may be kept: none is a view of memory
    that a later bucket reuses.
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
    # One gathered buffer per dtype, of the largest bucket of several parameters, reused by each of them:
    # fresh buffers would pay their page faults (CPU) or allocations again for each bucket. This rank's
    # shards are packed straight into its row, and the other ranks' rows are filled in place. What comes
    # out of it is copied (a consumer may keep a tensor past the next bucket: vLLM's reload defers a layer
    # until all of its weights have arrived). A parameter that travels alone gets memory of its own
    # instead, which its HF tensors may be views of (mapping.join_rows): no copy at all.
    largest: dict[torch.dtype, int] = {}
    for bucket in buckets:
        if len(bucket) > 1:
            largest[bucket[0].dtype] = max(largest.get(bucket[0].dtype, 0), sum(e.numel for e in bucket))
    gathered_buffers = {dtype: torch.empty(tp * n, dtype=dtype, device=device) for dtype, n in largest.items()}
    for bucket in buckets:
        stage, dtype = bucket[0].stage, bucket[0].dtype
        local_numel = sum(e.numel for e in bucket)
        if len(bucket) == 1:
            per_rank = torch.empty(tp, local_numel, dtype=dtype, device=device)
        else:
            per_rank = gathered_buffers[dtype][: tp * local_numel].view(tp, local_numel)
        if stage == my_stage:
            torch.cat([params[e.local_name].detach().reshape(-1) for e in bucket], out=per_rank[ctx.tp_rank])
            if tp > 1:
                gather_in_place(per_rank, ctx.tp_rank, parallel_state.get_tensor_model_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(per_rank, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        out = []
        start = 0
        for e in bucket:
            shards = [per_rank[r, start : start + e.numel].view(e.shape) for r in range(tp)]
            start += e.numel
            mapping = weight_map.resolve(e.global_name)
            tensors = mapping.transform.to_hf(shards, ctx)
            if len(bucket) > 1:  # a view of the reused buffer would change under a consumer that keeps it
                tensors = [t.clone() if _shares_memory(t, per_rank) else t for t in tensors]
            out += zip(mapping.hf, tensors, strict=True)
        yield out


def iter_hf_weights(
    model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig, bucket_bytes: int = 256 * 1024**2
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) one at a time, moved in buckets (see iter_hf_weight_buckets)."""
    for bucket in iter_hf_weight_buckets(model, args, cfg, bucket_bytes):
        yield from bucket
