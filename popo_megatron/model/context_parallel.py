"""Context parallelism: each packed sequence split over the CP ranks the load-balanced way, and the
autograd-aware gather and sum that put the pieces back together.

With `parallel.context_parallel_size` = cp > 1, every sequence of a pack (THD, algo/packing.py) is cut into
2 x cp equal chunks and CP rank r holds chunks r and 2cp - 1 - r: under a causal mask the early chunks are
cheap and the late ones dear, so every rank gets the same work. Transformer Engine's THD attention and
megatron-core's RoPE for THD (`_get_thd_freqs_on_this_cp_rank`) expect exactly this layout, so a sequence's
length must be a multiple of 2 x cp: packing pads each sequence up to one (the padding is in no loss).

Gradient convention. The CP ranks of a data-parallel rank hold the same micro-batches. Each computes the
whole micro-batch's loss from per-token values gathered over CP (as TP ranks each compute the whole loss),
so the loss code does not know about CP. Megatron's DDP averages the policy's gradients over the data- and
context-parallel ranks together (1 / (dp x cp)), which expects every rank's gradient to be cp times its
share: `gather_over_context_parallel` and `sum_over_context_parallel` therefore sum the ranks' gradients in
their backward. A head outside the model (algo/predictor.py) averages its gradients over the same group.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from popo_megatron.platform.megatron_compat import thd_rope_positions


def context_parallel_size() -> int:
    """The number of CP ranks (1 when Megatron's parallel state is not set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def local_positions(bounds: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """[width / cp_size] int64: the pack positions CP rank `cp_rank` holds, in the order it holds them, for a
    pack whose sequences (the padding after the last one included) are [bounds[i], bounds[i + 1])."""
    cu_seqlens = torch.tensor(list(bounds), dtype=torch.long)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    odd = (lengths % (2 * cp_size)).nonzero()
    if len(odd):
        i = int(odd[0])
        raise ValueError(
            f"a sequence of {int(lengths[i])} tokens (positions {bounds[i]}-{bounds[i + 1]}) cannot be split over "
            f"{cp_size} context-parallel ranks: its length must be a multiple of 2 x {cp_size}"
        )
    # The rows of RoPE's table megatron-core gives this rank, for a table of the whole pack: its positions.
    return thd_rope_positions(cu_seqlens, cp_size, cp_rank, with_offsets=True)


def held_positions(bounds: Sequence[int]) -> torch.Tensor | None:
    """This CP rank's positions of a pack with these sequence `bounds` (None without context parallelism:
    every position)."""
    from megatron.core import parallel_state

    cp = context_parallel_size()
    if cp == 1:
        return None
    return local_positions(bounds, cp, parallel_state.get_context_parallel_rank())


class _GatherOverContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, dim: int, bounds: tuple[int, ...]) -> torch.Tensor:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        where = torch.cat([local_positions(bounds, cp, r) for r in range(cp)]).to(local.device)
        ctx.dim, ctx.group, ctx.own = dim, group, where.view(cp, -1)[rank]  # this rank's part of `where`
        shape = list(local.shape)
        shape[dim] = bounds[-1]
        return local.new_empty(shape).index_copy_(dim, where, torch.cat(parts, dim))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.index_select(ctx.dim, ctx.own), None, None


def gather_over_context_parallel(local: torch.Tensor, dim: int, bounds: Sequence[int]) -> torch.Tensor:
    """The whole pack from each CP rank's `local` positions along `dim` (`held_positions(bounds)` order), in
    pack order (collective over the CP group; backward: the ranks' gradients summed, each rank's own
    positions)."""
    return _GatherOverContextParallel.apply(local, dim, tuple(int(b) for b in bounds))


class _SumOverContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        ctx.group = parallel_state.get_context_parallel_group()
        value = value.contiguous().clone()
        dist.all_reduce(value, group=ctx.group)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad


def sum_over_context_parallel(value: torch.Tensor) -> torch.Tensor:
    """The sum of each CP rank's partial `value` (e.g. a sum over its own positions), on every CP rank
    (collective; backward: the gradients summed, by the convention above). The identity without CP."""
    if context_parallel_size() == 1:
        return value
    return _SumOverContextParallel.apply(value)
