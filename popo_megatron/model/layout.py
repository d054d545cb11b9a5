"""Pure functions for how a model's shapes depend on the parallel layout.

Shared by config validation, the model builder and the weight mapping, so the
three can never disagree.
"""

from __future__ import annotations

import math


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up to a multiple of lcm(divisible_by, tp).

    Megatron-LM pads to a multiple of divisible_by * tp, which makes the
    embedding's shape depend on TP. The lcm gives the same size for every TP
    that divides `divisible_by` (1, 2, 4, 8 ... with the default 128), so a
    checkpoint's vocab rows do not change when it is resharded.
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def megatron_query_groups(num_kv_heads: int, tp: int) -> int:
    """Number of KV heads (query groups) in the Megatron model at this TP.

    Megatron needs the query groups divisible by TP. When the checkpoint has
    fewer KV heads than TP (e.g. 2 KV heads at TP=4) each KV head is replicated
    tp // num_kv_heads times, one copy per TP rank that needs it; the weight
    mapping writes identical copies and their gradients are summed across the
    copies (see popo_megatron.model.kv_replication).
    """
    if num_kv_heads % tp == 0:
        return num_kv_heads
    if tp % num_kv_heads == 0:
        return tp
    raise ValueError(f"{num_kv_heads} KV heads can be neither split nor replicated across TP={tp}")


def kv_replication_factor(num_kv_heads: int, tp: int) -> int:
    return megatron_query_groups(num_kv_heads, tp) // num_kv_heads
