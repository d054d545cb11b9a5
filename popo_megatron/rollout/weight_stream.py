"""The live Megatron model's weights as full HF-named tensors, for a rollout engine.

Every rank receives every tensor, as an engine replica needs (vLLM re-shards
full HF tensors itself). Parameters travel in buckets of about `bucket_bytes`:
each rank of the stage that holds a bucket packs its TP shards into its row of
a [tp, n] buffer; with PP, each row is broadcast to the matching TP rank of
the other stages (the pipeline group carries each byte once, not tp times);
then every stage gathers the rows inside its TP group, and the mapping table's
`to_hf` turns them into HF tensors (the same code the exporter uses). With one
TP rank and one stage there is nothing to gather: the parameters themselves
are the shards.

The TP gather is one all-gather (NCCL); on gloo, one in-place broadcast from
each TP rank (see gather_in_place), or, for CPU ranks of one host, nothing but
a barrier: the rows lie in memory they all map (platform/shared_rows). A
parameter larger than the bucket travels alone, and a dim-0-split one then
needs no re-layout at all (mapping.join_rows).

The plan (which parameter lives on which stage, with what shape) is rebuilt
from the model on every call: a cached plan can silently send stale or
misplaced weights after the model changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.model.forward import unwrap_model
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.platform.device import allocator_caches
from popo_megatron.platform.shared_rows import shared_rows
from popo_megatron.platform.torch_compat import storage_use_count
from popo_megatron.weights.load_hf import layer_offset, shard_context, weight_map_for
from popo_megatron.weights.mapping import ShardContext, Transform


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


class _GatherBuffers:
    """Where each bucket's [tp, n] rows are gathered.

    A bucket that fits the largest bucket of several parameters uses memory that every such bucket reuses:
    on CPU ranks of one host, slots they all map (platform/shared_rows: no bytes travel through gloo);
    elsewhere one private buffer, filled by collectives (fresh buffers would pay their page faults (CPU)
    or allocations again for each bucket). A larger parameter travels alone in memory of its own, which
    its HF tensors may be views of (mapping.join_rows): no copy at all.
    """

    def __init__(self, buckets: list[list[_Entry]], tp: int, device: torch.device, shared_memory: bool) -> None:
        from megatron.core import parallel_state

        self.tp = tp
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.device = device
        self.slot_bytes = max((_rows_bytes(b, tp) for b in buckets if len(b) > 1), default=0)
        use_shared = shared_memory and tp > 1 and self.slot_bytes > 0
        self.shared = shared_rows(self.group, self.slot_bytes) if use_shared else None
        self.private: torch.Tensor | None = None  # allocated on first use

    def reused(self, bucket: list[_Entry]) -> bool:
        """Whether the bucket's rows lie in memory that a later bucket reuses (else: memory of their own)."""
        return _rows_bytes(bucket, self.tp) <= self.slot_bytes

    def rows(self, bucket: list[_Entry]) -> torch.Tensor:
        """The bucket's [tp, n] rows."""
        numel, dtype = _numel(bucket), bucket[0].dtype
        if not self.reused(bucket):
            return torch.empty(self.tp, numel, dtype=dtype, device=self.device)
        if self.shared is not None:
            return self.shared.next_rows(numel, dtype)
        if self.private is None:
            self.private = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        return self.private[: self.tp * numel * dtype.itemsize].view(dtype).view(self.tp, numel)

    def gather(self, per_rank: torch.Tensor, reused: bool) -> None:
        """Fill the other ranks' rows of `per_rank` (this rank's row is written)."""
        if self.tp == 1:
            return
        if reused and self.shared is not None:
            self.shared.exchange()
        else:
            gather_in_place(per_rank, self.rank, self.group)


class _OutputArenas:
    """Memory for the HF tensors of buckets whose rows are reused, taken again once nothing else holds a
    tensor in it.

    The stream's tensors may be kept (vLLM's reload holds a layer's tensors until all of them arrived), so
    they cannot be views of rows the next bucket overwrites; fresh memory for each bucket would cost a page
    fault per 4 KiB on CPU, more than the copy into it. Each arena fits any bucket; of those still held by
    a consumer, the oldest are left to it: this keeps at most `_ARENAS`.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.nbytes = nbytes
        self.device = device
        self._arenas: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        for arena in self._arenas:
            if storage_use_count(arena) == 1:  # this list's reference only
                return arena
        arena = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._arenas.append(arena)
        del self._arenas[:-_ARENAS]
        return arena


_ARENAS = 3  # the bucket being written, the previous one (iter_hf_weights holds it), a deferred layer's
_kept_arenas: _OutputArenas | None = None


def _output_arenas(nbytes: int, device: torch.device) -> _OutputArenas:
    """Arenas of at least `nbytes`. Where torch's allocator keeps freed memory (GPU), each call's arenas are
    released with it; elsewhere (CPU) the same ones serve every call: a trainer streams every step, and new
    memory would cost its page faults again."""
    global _kept_arenas
    if allocator_caches(device):
        return _OutputArenas(nbytes, device)
    if _kept_arenas is None or _kept_arenas.nbytes < nbytes:
        _kept_arenas = _OutputArenas(nbytes, device)
    return _kept_arenas


def _numel(bucket: list[_Entry]) -> int:
    return sum(e.numel for e in bucket)


def _rows_bytes(bucket: list[_Entry], tp: int) -> int:
    return tp * _numel(bucket) * bucket[0].dtype.itemsize


def iter_hf_weight_buckets(
    model: torch.nn.Module,
    args: HFModelArgs,
    cfg: DictConfig,
    bucket_bytes: int = 256 * 1024**2,
    shared_memory: bool = True,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor) covering every weight of the model once.

    Collective over the model-parallel groups: every rank must consume the iterator to the end. The
    tensors may be kept: none is a view of memory that a later bucket writes while they are held.
    `shared_memory`: on CPU, TP ranks of one host gather through memory they share (False: through gloo,
    as across hosts).
    """
    from megatron.core import parallel_state

    model = unwrap_model(model)
    weight_map = weight_map_for(args, cfg)
    ctx = shard_context(args, cfg)
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    buckets = _buckets(_plan(model, args, cfg), ctx.tp_size, bucket_bytes)
    pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
    buffers = _GatherBuffers(buckets, ctx.tp_size, device, shared_memory)
    # HF tensors hold no more bytes than the gathered shards (vocabulary padding and replicated KV heads
    # are dropped): an arena of the largest reused rows fits any bucket's.
    arenas = _output_arenas(buffers.slot_bytes, device)
    for bucket in buckets:
        stage = bucket[0].stage
        reused = buffers.reused(bucket)
        if reused and ctx.tp_size == 1 and not pipeline:
            # One TP rank and one stage: the parameters are the shards, copied once, into the arena.
            shards_of = [[params[e.local_name].detach()] for e in bucket]
        else:
            per_rank = buffers.rows(bucket)
            own_row = per_rank[ctx.tp_rank]
            if stage == my_stage:  # this rank's shards, packed straight into its row
                torch.cat([params[e.local_name].detach().reshape(-1) for e in bucket], out=own_row)
            if pipeline:
                # Each TP rank of the other stages receives the row of the TP rank it matches, and the TP
                # gather below completes the rows on every stage: the pipeline group carries 1/tp of the bytes.
                dist.broadcast(own_row, src=dist.get_global_rank(pp_group, stage), group=pp_group)
            buffers.gather(per_rank, reused)
            shards_of, start = [], 0
            for e in bucket:
                shards_of.append([per_rank[r, start : start + e.numel].view(e.shape) for r in range(ctx.tp_size)])
                start += e.numel
            del per_rank, own_row
        arena = arenas.take() if reused else None
        out = []
        offset = 0
        for e, shards in zip(bucket, shards_of, strict=True):
            mapping = weight_map.resolve(e.global_name)
            if arena is None:  # rows of its own: the HF tensors may be views of them
                tensors = mapping.transform.to_hf(shards, ctx)
            else:
                tensors = []
                for shape in _hf_shapes(mapping.transform, torch.Size(e.shape), ctx):
                    nbytes = shape.numel() * e.dtype.itemsize
                    tensors.append(arena[offset : offset + nbytes].view(e.dtype).view(shape))
                    offset += nbytes
                mapping.transform.to_hf_into(shards, ctx, tensors)
            out += zip(mapping.hf, tensors, strict=True)
        del arena, shards_of, shards, tensors  # the arena is free again once the consumer lets go
        yield out
        del out


@functools.lru_cache(maxsize=4096)
def _hf_shapes(transform: Transform, shard_shape: torch.Size, ctx: ShardContext) -> tuple[torch.Size, ...]:
    """The shapes of the HF tensors `transform` makes of TP shards of `shard_shape`, computed without data
    (once per parameter shape: it costs as much as the copies of small tensors)."""
    shards = [torch.empty(shard_shape, device="meta")] * ctx.tp_size
    return tuple(t.shape for t in transform.to_hf(shards, ctx))


def iter_hf_weights(
    model: torch.nn.Module,
    args: HFModelArgs,
    cfg: DictConfig,
    bucket_bytes: int = 256 * 1024**2,
    shared_memory: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) one at a time, moved in buckets (see iter_hf_weight_buckets)."""
    for bucket in iter_hf_weight_buckets(model, args, cfg, bucket_bytes, shared_memory):
        yield from bucket
        del bucket  # not held while the next bucket is made: its arena can be reused
