"""Every use of megatron-core internals outside its public API, in one place.

Written against megatron-core 0.16.1 (the CPU stack; what 0.17-0.19 change is issue-tracked for the GPU
check). Anything that reads a private attribute of megatron-core goes through here, so a version bump has
one file to read. The CPU patches of megatron-core are in cpu_compat.py (they only run without CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BucketParam:
    param: torch.nn.Parameter
    start: int  # the parameter's flat range within its bucket
    end: int


@dataclass(frozen=True)
class DDPBucket:
    """A gradient/parameter bucket of Megatron's DDP: with the distributed optimiser, each rank of
    `group` owns an equal contiguous slice of `param_data` (`rank_shard`)."""

    param_data: torch.Tensor  # the bucket's whole 1-D view of the parameter buffer
    group: dist.ProcessGroup
    params: list[BucketParam]

    def rank_shard(self) -> slice:
        """This rank's slice, as DistributedOptimizer shards a bucket (`shard_buffer`: equal parts in rank
        order; buckets are padded to a multiple of the group size)."""
        per_rank = self.param_data.numel() // self.group.size()
        rank = self.group.rank()
        return slice(rank * per_rank, (rank + 1) * per_rank)


def uses_distributed_optimizer(ddp_model: torch.nn.Module) -> bool:
    """Whether Megatron's DDP wrapper was built for the distributed optimiser (ZeRO-1 sharded buckets)."""
    ddp_config = getattr(ddp_model, "ddp_config", None)
    return bool(ddp_config is not None and ddp_config.use_distributed_optimizer)


def ddp_buckets(ddp_model: torch.nn.Module) -> list[DDPBucket]:
    """The buckets of Megatron's DistributedDataParallel, with each parameter's range in its bucket.

    Private in 0.16: `DistributedDataParallel.buffers` / `expert_parallel_buffers` (lists of
    `_ParamAndGradBuffer`), their `buckets` (`_ParamAndGradBucket`: `param_data`, `params_list`, `offset`),
    `param_index_map[param] = (start, end, bucket_id)` and `data_parallel_group`.
    """
    out = []
    for buffer in ddp_model.buffers + ddp_model.expert_parallel_buffers:
        for bucket in buffer.buckets:
            params = []
            for param in bucket.params_list:
                start, end, _ = buffer.param_index_map[param]
                params.append(BucketParam(param, start - bucket.offset, end - bucket.offset))
            out.append(DDPBucket(bucket.param_data, buffer.data_parallel_group, params))
    return out


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimisers inside a MegatronOptimizer (a ChainedOptimizer holds one per parameter group
    kind; each Megatron optimiser wraps its torch optimiser as `.optimizer`)."""
    return [chained.optimizer for chained in getattr(optimizer, "chained_optimizers", [optimizer])]


def thd_rope_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, with_offsets: bool) -> torch.Tensor:
    """[T_local] int64: the row of RoPE's frequency table for each position this CP rank holds of a THD pack,
    as megatron-core's `_get_thd_freqs_on_this_cp_rank` takes them sequence by sequence: each sequence's own
    positions (its chunks r and 2cp - 1 - r under context parallelism), plus the sequence's start in the pack
    when the table covers the whole pack (`with_offsets`)."""
    global_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    lengths = global_lengths // cp_size  # what this rank holds of each
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    firsts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(int(lengths.sum()), device=lengths.device) - firsts[sequence]
    if cp_size > 1:
        chunk = lengths[sequence] // 2
        late = global_lengths[sequence] - (cp_rank + 1) * chunk + (local - chunk)
        local = torch.where(local < chunk, cp_rank * chunk + local, late)
    if with_offsets:
        local = local + cu_seqlens[:-1].long()[sequence]
    return local


def install_vectorized_thd_rope() -> None:
    """Replace megatron-core's unfused RoPE for THD (packed) sequences, which loops over the sequences in
    Python (a slice, a concatenation and a `.item()` each: thousands per forward for a pack of short
    sequences), with the same arithmetic on one gathered frequency table. Idempotent. The fused path
    (`apply_rope_fusion`, Transformer Engine on GPU) does not use the replaced function."""
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_thd
    if getattr(original, "_popo_vectorized", False):
        return

    def apply_thd(
        t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0, cp_group=None
    ):
        if cp_group is None:
            raise ValueError("cp_group must be provided for THD format RoPE")
        # megatron-core's two cases: a table of the whole pack's positions (offsets), or of one sequence's.
        with_offsets = freqs.dim() >= 1 and freqs.size(0) == int(cu_seqlens[-1])
        rows = thd_rope_positions(cu_seqlens.to(freqs.device), cp_group.size(), cp_group.rank(), with_offsets)
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1),
            freqs[rows],
            rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention,
            mscale=mscale,
        ).squeeze(1)

    apply_thd._popo_vectorized = True
    apply_thd._popo_original = original
    rope_utils._apply_rotary_pos_emb_thd = apply_thd
