"""The local layer spec's attention, taught Megatron's THD packing: packed sequences attend within
themselves, as Transformer Engine's attention does on GPU.

megatron-core's `DotProductAttention` (the local spec, what runs on CPU) refuses `packed_seq_params`. With
them, `SelfAttention` hands its core attention one pack as [tokens, heads, head_dim] (THD, the RoPE already
applied per sequence, restarting at each boundary) and expects [tokens, heads x head_dim] back. This class
runs megatron-core's own causal attention on the pack's sequences, those of one length as one batch, so
the packed forward is the padded one's per sequence and the work is the sum of the sequences' squares, not
the pack's square.
Without `packed_seq_params` it is megatron-core's class unchanged.

Under context parallelism (CPU only: on GPU, Transformer Engine's attention exchanges K/V blocks in a ring)
each rank holds its share of every sequence (model/context_parallel.py). Here the shares of q, k and v are
gathered over the CP ranks, each rank attends over the whole pack and keeps its own positions' output. That
is the same attention, so CP is tested on CPU for correctness (RoPE, the split, the reductions, the
gradients), but its work and memory are not divided: the point of CP is the GPU path.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from popo_megatron.model.context_parallel import gather_over_context_parallel, held_positions


class PackedDotProductAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        # megatron-core's class refuses context parallelism (it has no CP exchange); this one gathers the
        # sequence over the CP ranks itself, so the base class sees a CP-free config.
        local = copy.copy(config)
        object.__setattr__(local, "context_parallel_size", 1)
        super().__init__(local, *args, **kwargs)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences come in the THD format, not {packed_seq_params.qkv_format!r}")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        held = held_positions(bounds)
        if held is None:
            return self._attend_within_sequences(query, key, value, bounds, attn_mask_type, attention_bias)
        query, key, value = (gather_over_context_parallel(x, 0, bounds) for x in (query, key, value))
        out = self._attend_within_sequences(query, key, value, bounds, attn_mask_type, attention_bias)
        return out[held.to(out.device)]

    def _attend_within_sequences(self, query, key, value, bounds, attn_mask_type, attention_bias):
        """[tokens, heads x head_dim]: causal attention of each sequence [bounds[i], bounds[i + 1]) of one
        whole pack [tokens, heads, head_dim] within itself."""
        by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                by_length.setdefault(end - start, []).append(start)
        out = None
        # Sequences of one length go as one batch (megatron-core's [s, b, heads, d] layout), causal within each:
        # a pack of many short sequences costs a few calls, not one per sequence.
        for length, starts in by_length.items():
            rows = torch.tensor(starts, device=query.device).unsqueeze(0) + torch.arange(
                length, device=query.device
            ).unsqueeze(1)  # [s, b]: the pack positions of each sequence
            part = super().forward(query[rows], key[rows], value[rows], None, attn_mask_type, attention_bias)
            if out is None:
                out = part.new_zeros(query.shape[0], part.shape[-1])
            out = out.index_copy(0, rows.reshape(-1), part.reshape(-1, part.shape[-1]))
        return out
