"""Sequences packed into token-budget micro-batches, and balanced over data-parallel ranks by tokens.

A padded micro-batch of `micro_batch_size` rows costs the longest row times the row count; with
long-tailed reasoning traces most of it is padding, and one row at the length limit sets the memory of
all. Packing puts whole sequences one after the other into micro-batches of at most
`train.max_tokens_per_microbatch` tokens, without padding between them.

In a pack each position knows its sequence (`sequence_index`, -1 for the padding after the last one), and
attention must not cross sequences: the model gets each pack in Megatron's THD layout with the sequences'
boundaries (`thd_params`: `cu_seqlens`); Transformer Engine's attention on GPU and the local spec's
(model/packed_attention.py) attend within each sequence, and RoPE restarts at each boundary.

The same packing serves every pass of a step (old log-probs, the target's forward, the update), so they
see identical shapes and an on-policy ratio stays exactly 1.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch


def pack_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of `lengths` in packs of at most `budget` tokens each: first-fit decreasing (at most
    11/9 of the fewest packs plus one). Each pack lists its sequences longest first; the packs come in
    the order they were opened (the fullest first)."""
    if budget < 1:
        raise ValueError(f"a token budget must be at least 1, got {budget}")
    for index, length in enumerate(lengths):
        if length > budget:
            raise ValueError(
                f"sequence {index} has {length} tokens, more than the micro-batch budget of {budget} "
                "(train.max_tokens_per_microbatch): raise the budget to at least the longest prompt + response "
                "(rollout.max_tokens plus the longest prompt)"
            )
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((p for p, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            packs.append([])
            room.append(budget)
            target = len(packs) - 1
        packs[target].append(index)
        room[target] -= lengths[index]
    return packs


def split_into(packs: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """`packs` made exactly `count` (at least as many): the pack of most tokens that holds more than one
    sequence is halved by tokens until there are enough; when none is left to halve, empty packs are added
    (Megatron's schedules need the same number of micro-batches on every data-parallel rank)."""
    if count < len(packs):
        raise ValueError(f"{len(packs)} packs cannot be made {count}")
    packs = [list(p) for p in packs]
    while len(packs) < count:
        splittable = [p for p in range(len(packs)) if len(packs[p]) > 1]
        if not splittable:
            packs.extend([] for _ in range(count - len(packs)))
            break
        widest = max(splittable, key=lambda p: sum(lengths[i] for i in packs[p]))
        halves = balance_by_tokens([lengths[i] for i in packs[widest]], 2)
        members = packs[widest]
        packs[widest] = [members[i] for i in halves[0]]
        packs.insert(widest + 1, [members[i] for i in halves[1]])
    return packs


def balance_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """The indices of `lengths` in `parts` groups of near-equal token sums (the Karmarkar-Karp largest
    differencing method, as verl balances sequence lengths over data-parallel ranks): repeatedly merge the
    two partial partitions of the largest spread, the largest group of one with the smallest of the other.
    Each group's indices are sorted."""
    if parts < 1:
        raise ValueError(f"cannot balance over {parts} groups")
    # A partial partition: (-(spread), tie-break, groups as (sum, indices), sorted by sum, largest first).
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for order, index in enumerate(sorted(range(len(lengths)), key=lambda i: -lengths[i])):
        groups = [(lengths[index], [index])] + [(0, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-lengths[index], order, groups))
    if not heap:
        return [[] for _ in range(parts)]
    order = len(heap)
    while len(heap) > 1:
        _, _, first = heapq.heappop(heap)
        _, _, second = heapq.heappop(heap)
        merged = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(first, reversed(second), strict=True)]
        merged.sort(key=lambda g: -g[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), order, merged))
        order += 1
    return [sorted(indices) for _, indices in heap[0][2]]


def sequence_index(lengths: Sequence[int], width: int) -> torch.Tensor:
    """[width] int64: the sequence (0, 1, ...) of each position of one pack of sequences of `lengths` laid
    end to end, -1 for the padding after them."""
    total = sum(lengths)
    if total > width:
        raise ValueError(f"sequences of {total} tokens do not fit a pack of {width}")
    index = torch.full((width,), -1, dtype=torch.long)
    index[:total] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths), dtype=torch.long))
    return index


def positions_in_sequence(index: torch.Tensor) -> torch.Tensor:
    """[P, T] int64: each position's offset in its own sequence (padding continues its run), from a
    [P, T] `sequence_index`."""
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[:, 1:] = index[:, 1:] != index[:, :-1]
    columns = torch.arange(index.shape[1], device=index.device).expand_as(index)
    last_start = torch.where(starts, columns, 0).cummax(dim=1).values
    return columns - last_start


def pack_bounds(lengths: Sequence[int], width: int, piece: int = 1) -> list[int]:
    """The boundaries of one pack of `width` positions holding sequences of `lengths` end to end: [0, l0,
    l0 + l1, ..., width]. The padding after the last sequence comes as sequences of `piece` tokens each
    (2 x CP under context parallelism, else 1): attention within a sequence costs its square, and as one
    sequence the padding of a pack that is mostly empty (a pass over a few of the update's rows, in the
    update's shapes) cost more than the whole pack's real sequences."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    if bounds[-1] > width:
        raise ValueError(f"sequences of {bounds[-1]} tokens do not fit a pack of {width}")
    if (width - bounds[-1]) % piece:
        raise ValueError(f"the padding of a pack ({width - bounds[-1]} positions) is not a multiple of {piece}")
    bounds.extend(range(bounds[-1] + piece, width + 1, piece))
    return bounds


def thd_params(bounds: Sequence[int]):
    """Megatron's PackedSeqParams (THD) for one pack of sequences with these `pack_bounds`."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = torch.tensor(list(bounds), dtype=torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(bounds) > 1 else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
