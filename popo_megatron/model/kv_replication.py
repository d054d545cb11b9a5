"""Gradient bookkeeping for KV heads replicated across tensor-parallel ranks.

When a model has fewer KV heads than TP (popo_megatron.model.layout), every
TP rank holds one query group and `rep = TP / num_kv_heads` neighbouring ranks
hold identical copies of the same HF KV head. Each copy only sees the gradient
of its own query heads; the true gradient of the shared head is the sum over
the copies. Summing it on every copy keeps the copies identical through
training, so exports and weight syncs may read any one of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_GROUPS: dict[tuple[int, int], dist.ProcessGroup] = {}


def _replica_group(rep: int) -> dist.ProcessGroup:
    """This rank's group of TP ranks holding copies of the same KV head.

    Created on first use by every rank (new_group is collective): the TP
    groups of the whole world are gathered so all ranks create the same groups
    in the same order.
    """
    from megatron.core import parallel_state

    key = (parallel_state.get_tensor_model_parallel_world_size(), rep)
    if key not in _GROUPS:
        tp_ranks = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
        all_tp_groups: list[list[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(all_tp_groups, tp_ranks)
        mine = None
        for ranks in sorted({tuple(r) for r in all_tp_groups}):
            for start in range(0, len(ranks), rep):
                members = list(ranks[start : start + rep])
                group = dist.new_group(members)
                if dist.get_rank() in members:
                    mine = group
        _GROUPS[key] = mine
    return _GROUPS[key]


def sum_replicated_kv_grads(model: torch.nn.Module, head_dim: int, rep: int) -> None:
    """Sum the K and V rows of linear_qkv's gradients over the copies of each KV head.

    Call after the data-parallel gradient reduction (it acts on `main_grad` when
    the model is wrapped in Megatron DDP, else on `grad`).
    """
    if rep == 1:
        return
    group = _replica_group(rep)
    grads = []
    for name, param in model.named_parameters():
        if "linear_qkv" not in name:
            continue
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            # One query group per rank: the rows end with [k (head_dim), v (head_dim)].
            grads.append(grad[-2 * head_dim :])
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def make_finalize_grads_func(head_dim: int, rep: int):
    """Megatron's finalize_model_grads (DP / SP / qk-norm / embedding reductions)
    followed by the KV-replica sum; set it as `config.finalize_model_grads_func`."""
    from megatron.core.distributed import finalize_model_grads

    def finalize(model_chunks, num_tokens=None, *args, **kwargs):
        finalize_model_grads(model_chunks, num_tokens, *args, **kwargs)
        for chunk in model_chunks:
            sum_replicated_kv_grads(chunk, head_dim, rep)

    return finalize
