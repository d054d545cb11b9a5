"""The local layer spec's attention, taught Megatron's THD packing: packed sequences attend within
themselves, as Transformer Engine's attention does on GPU.

megatron-core's `DotProductAttention` (the local spec, what runs on CPU) refuses `packed_seq_params`. With
them, `SelfAttention` hands its core attention one pack as [tokens, heads, head_dim] (THD, the RoPE already
applied per sequence, restarting at each boundary) and expects [tokens, heads x head_dim] back. This class
runs megatron-core's own causal attention on the pack's sequences, those of one length as one batch, so
the packed forward is the padded one's per sequence and the work is the sum of the sequences' squares, not
the pack's square.
Without `packed_seq_params` it is megatron-core's class unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences come in the THD format, not {packed_seq_params.qkv_format!r}")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
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
