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
