"""Context parallelism's pieces: the load-balanced split of each packed sequence against megatron-core's own
RoPE slicing for THD, the split's inverse, and the gather and sum over a real two-rank gloo CP group with
their gradients against closed forms. (A whole training step at CP=2 is checked against the reference in
test_popo_step.py.)"""

from __future__ import annotations

import pytest
import torch

from popo_megatron.launch import run_local
from popo_megatron.model.context_parallel import local_positions

# Pack boundaries per CP size: every sequence (the trailing padding included) a multiple of 2 x CP.
BOUNDS = {2: [0, 8, 12, 24, 32], 3: [0, 6, 18, 24], 4: [0, 16, 24]}


@pytest.mark.parametrize("cp", sorted(BOUNDS))
def test_each_rank_holds_the_positions_megatrons_thd_rope_gives_it(cp):
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    bounds = BOUNDS[cp]
    held = [local_positions(bounds, cp, rank) for rank in range(cp)]
    for rank in range(cp):
        expected = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            # megatron-core's RoPE slices a sequence's position table for this rank: with the table of
            # positions itself, what it returns is the positions the rank holds.
            local = torch.zeros((end - start) // cp, 1)
            expected.append(start + _get_thd_freqs_on_this_cp_rank(rank, cp, local, torch.arange(end - start)))
        assert held[rank].tolist() == torch.cat(expected).tolist()
    # The split's inverse: the ranks' positions together are every position once.
    assert sorted(torch.cat(held).tolist()) == list(range(bounds[-1]))
    assert all(len(h) == bounds[-1] // cp for h in held)


def test_chunks_are_balanced_for_causal_attention():
    """Rank r holds chunks r and 2cp - 1 - r of each sequence: the causal work (the sum of its positions + 1)
    is the same on every rank."""
    bounds = [0, 16]
    work = [int((local_positions(bounds, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1 and local_positions(bounds, 4, 1).tolist() == [2, 3, 12, 13]


def test_a_sequence_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match=r"positions 8-14\).* multiple of 2 x 2"):
        local_positions([0, 8, 14], 2, 0)


def _gather_and_sum_worker() -> None:
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    from popo_megatron.model.context_parallel import (
        gather_over_context_parallel,
        held_positions,
        sum_over_context_parallel,
    )
    from popo_megatron.platform import init_model_parallel

    init_model_parallel(
        OmegaConf.create(
            {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 2}
        )
    )
    assert parallel_state.get_context_parallel_world_size() == 2
    assert parallel_state.get_data_parallel_world_size() == 1
    bounds = [0, 8, 12, 24]
    held = held_positions(bounds)
    gen = torch.Generator().manual_seed(0)  # the same tensors on both ranks
    full = torch.randn(3, 24, generator=gen)
    weight = torch.randn(3, 24, generator=gen)

    # Along the last dim ([P, T] log-probs) and the first ([T, heads, d] attention inputs).
    for dim, whole, w in ((1, full, weight), (0, full.T.reshape(24, 3, 1), weight.T.reshape(24, 3, 1))):
        local = whole.index_select(dim, held).clone().requires_grad_()
        gathered = gather_over_context_parallel(local, dim, bounds)
        assert torch.equal(gathered, whole)
        (gathered * w).sum().backward()
        # Each rank's loss is the whole loss; the backward sums the ranks' gradients: CP times the share.
        torch.testing.assert_close(local.grad, 2 * w.index_select(dim, held))

    local = full[:, held].clone().requires_grad_()
    partial = local.sum(1)
    total = sum_over_context_parallel(partial)
    torch.testing.assert_close(total, full.sum(1))
    coefficients = torch.tensor([1.0, -2.0, 0.5])
    (total * coefficients).sum().backward()
    torch.testing.assert_close(local.grad, 2 * coefficients.unsqueeze(1).expand_as(local))


def test_gather_and_sum_over_a_two_rank_context_parallel_group():
    run_local(_gather_and_sum_worker, 2)


class _Group:
    """What megatron-core's THD RoPE asks of a CP group: its size and this rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_vectorized_thd_rope_equals_megatrons_loop(cp):
    """The packed path's RoPE (platform/megatron_compat.install_vectorized_thd_rope) gives megatron-core's
    own per-sequence loop's result, with and without CP, for a table of one sequence's positions and for one
    of the whole pack's (megatron-core's offset mode)."""
    from megatron.core.models.common.embeddings import rope_utils

    from popo_megatron.platform.megatron_compat import install_vectorized_thd_rope

    install_vectorized_thd_rope()
    vectorized = rope_utils._apply_rotary_pos_emb_thd
    original = vectorized._popo_original
    gen = torch.Generator().manual_seed(cp)
    lengths = [2 * cp * n for n in (3, 1, 5, 2)] if cp > 1 else [5, 1, 7, 2, 3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for table in (max(lengths), int(cu_seqlens[-1])):
        freqs = torch.randn(table, 1, 1, 8, generator=gen)
        for rank in range(cp):
            t = torch.randn(int(cu_seqlens[-1]) // cp, 3, 8, generator=gen)
            expected = original(t, cu_seqlens, freqs, cp_group=_Group(cp, rank))
            torch.testing.assert_close(vectorized(t, cu_seqlens, freqs, cp_group=_Group(cp, rank)), expected)
