"""What a step's trainer passes will hold, before a job runs: micro-batches and activation memory for a
layout, a micro-batching (padded rows or a token budget) and a response-length distribution.

`popo layout CONFIG --world N --response-median M` prints it. The activation estimate counts the tensors
each transformer layer keeps for its backward in bf16 without recomputation, per token (Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models", adapted to RMSNorm, grouped-query
attention and SwiGLU; dropout is off in RL fine-tuning, so no masks):

    attention   2h (norm input) + 2h (QKV input) + 2(h + 2 kv d) (Q, K, V) + 2h (context: the projection's input)
    MLP         2h (norm input) + 2h (fc1 input) + 4f (gate, up) + 2f (SiLU out) + 2f (fc2 input)

The tensors split by heads (Q, K, V, context, the MLP's inner ones) divide by TP; the norm and linear
inputs (8h) divide by TP with sequence parallelism and are whole on every TP rank without it. The local
spec's attention adds its probabilities, 2 a s / TP bytes a token for a sequence dimension of s (a padded
row's width, or a whole pack's: the mask does not shrink the scores); Transformer Engine's fused attention
keeps none. The last
stage adds its logits' gradient (2 V / TP a token) and two fp32 [chunk, V/TP] buffers (algo/logprobs.py).
Under the 1F1B schedule the first pipeline stage holds up to PP micro-batches in flight, each of its L / PP
layers. It is an estimate: allocator overheads, weights, gradients and optimiser state are not in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from popo_megatron.algo.packing import pack_by_tokens
from popo_megatron.model.hf_config import HFModelArgs


def long_tailed_lengths(count: int, limit: int, median: float, at_limit: float = 0.1, seed: int = 0) -> list[int]:
    """`count` response lengths as reasoning traces are: lognormal with `median` (sigma 1), a fraction
    `at_limit` of them cut at `limit`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + torch.randn(count, generator=gen)).round().clamp(1, limit).long()
    lengths[torch.randperm(count, generator=gen)[: int(count * at_limit)]] = limit
    return lengths.tolist()


@dataclass(frozen=True)
class PassPlan:
    micro_batches: int
    computed_tokens: int  # positions the passes compute, padding included
    real_tokens: int
    widest: int  # positions of the largest micro-batch (rows x width, or a pack)

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


def plan_padded(lengths: Sequence[int], rows: int) -> PassPlan:
    """Micro-batches of `rows` rows, each padded to the longest of the batch (the trainer's padded form)."""
    count = max(1, -(-len(lengths) // rows))
    width = max(lengths, default=1)
    return PassPlan(count, count * rows * width, sum(lengths), min(rows, len(lengths)) * width)


def plan_packed(lengths: Sequence[int], budget: int, pipeline: bool, multiple: int = 1) -> PassPlan:
    """Packs of at most `budget` tokens (with pipeline parallelism every pack padded to the budget), each
    sequence rounded up to `multiple` tokens (2 x CP under context parallelism: the rest is padding)."""
    rounded = [-(-n // multiple) * multiple for n in lengths]
    packs = pack_by_tokens(rounded, budget)
    widths = [budget if pipeline else sum(rounded[i] for i in p) for p in packs]
    widest = budget if pipeline else max(widths, default=1)
    return PassPlan(max(1, len(packs)), sum(widths) if not pipeline else len(packs) * budget, sum(lengths), widest)


def activation_bytes_per_token(
    args: HFModelArgs, tp: int, sequence_parallel: bool, fused_attention: bool, tokens: int
) -> float:
    """One layer's kept activations per token, bf16, for a sequence dimension of `tokens` (see the module
    docstring)."""
    h, f, d = args.hidden_size, args.intermediate_size, args.head_dim
    kv, heads = args.num_kv_heads, args.num_attention_heads
    by_heads = 2 * (h + 2 * kv * d) + 2 * h + 8 * f
    by_sequence = 8 * h
    per_token = by_heads / tp + (by_sequence / tp if sequence_parallel else by_sequence)
    if not fused_attention:
        per_token += 2 * heads * tokens / tp
    return per_token


def peak_activation_bytes(
    args: HFModelArgs,
    micro_tokens: int,
    attention_span: int,
    tp: int,
    pp: int,
    sequence_parallel: bool,
    fused_attention: bool,
    micro_batches: int,
    chunk_tokens: int = 1024,
) -> dict[str, float]:
    """Bytes of activations at the peak of a pass: per micro-batch (one stage's layers), on the first stage
    (up to PP micro-batches in flight) and on the last (one micro-batch, plus the logits' share)."""
    layers = args.num_layers / pp
    per_layer = activation_bytes_per_token(args, tp, sequence_parallel, fused_attention, attention_span) * micro_tokens
    micro = per_layer * layers
    vocab = args.vocab_size / tp
    logits = micro_tokens * vocab * 2 * 2 + 2 * min(chunk_tokens, micro_tokens) * vocab * 4  # bf16 + grad; fp32
    return {
        "micro_batch": micro,
        "first_stage": micro * min(pp, micro_batches),
        "last_stage": micro + logits,
    }
