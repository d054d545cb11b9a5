"""The HF <-> Megatron mapping table, without a model: shard then merge is the identity
at every TP size, and the shards have the layout Megatron expects."""

from __future__ import annotations

import pytest
import torch

from popo_megatron.model.hf_config import parse_hf_config
from popo_megatron.weights.mapping import (
    QKV,
    GatedFC1,
    MappingError,
    Replicated,
    RowSplit,
    ShardContext,
    VocabSplit,
    WeightMap,
    join_rows,
)


def _args(heads=8, kv=2, head_dim=4, hidden=16, inter=24, vocab=50, **extra):
    return parse_hf_config(
        dict(
            architectures=["Qwen2ForCausalLM"],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            **extra,
        )
    )


def _roundtrip(transform, hf, args, tp):
    ctxs = [ShardContext.create(args, r, tp, vocab_divisible_by=8) for r in range(tp)]
    shards = [transform.read_shard(hf, ctx) for ctx in ctxs]
    return shards, transform.to_hf(shards, ctxs[0])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("kv", [1, 2, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_roundtrip_and_layout(tp, kv, bias):
    args = _args(kv=kv)
    d = args.head_dim
    shape = (lambda rows: (rows,)) if bias else (lambda rows: (rows, args.hidden_size))
    q = torch.randn(shape(args.num_attention_heads * d))
    k = torch.randn(shape(kv * d))
    v = torch.randn(shape(kv * d))
    shards, (q2, k2, v2) = _roundtrip(QKV(), [q, k, v], args, tp)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    # Independent check of Megatron's layout: query head h sits in group h // (heads/groups)
    # next to the k/v of HF KV head h // (heads/kv).
    groups = max(kv, tp)
    per_group = args.num_attention_heads // groups
    full = torch.cat(shards).reshape(groups, per_group + 2, d, *q.shape[1:])
    for h in range(args.num_attention_heads):
        g = h // per_group
        assert torch.equal(full[g, h % per_group], q.reshape(-1, d, *q.shape[1:])[h])
        assert torch.equal(full[g, per_group], k.reshape(-1, d, *k.shape[1:])[h // (args.num_attention_heads // kv)])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_per_shard_concat(tp):
    args = _args()
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    shards, (g2, u2) = _roundtrip(GatedFC1(), [gate, up], args, tp)
    assert torch.equal(gate, g2) and torch.equal(up, u2)
    rows = 24 // tp
    for r, shard in enumerate(shards):  # [gate_r; up_r], not a slice of [gate; up]
        assert torch.equal(shard, torch.cat([gate[r * rows : (r + 1) * rows], up[r * rows : (r + 1) * rows]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_padding_and_row_split(tp):
    args = _args(vocab=50)
    emb = torch.randn(50, 16)
    shards, (emb2,) = _roundtrip(VocabSplit(), [emb], args, tp)
    assert torch.equal(emb, emb2)
    full = torch.cat(shards)
    assert full.shape[0] == 56 and torch.all(full[50:] == 0)  # padded to a multiple of lcm(8, tp)
    w = torch.randn(16, 32)
    _, (w2,) = _roundtrip(RowSplit(), [w], args, tp)
    assert torch.equal(w, w2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_to_hf_of_shards_end_to_end_in_one_buffer(tp):
    """The weight stream hands a parameter that travelled alone as its shards in consecutive rows of one
    buffer: to_hf must give what it gives for separate shards, and the joins must not copy."""
    args = _args(vocab=50, kv=2)
    d = args.head_dim
    hf_sets = {
        VocabSplit(): [torch.randn(50, 16)],
        QKV(): [torch.randn(args.num_attention_heads * d, 16), torch.randn(2 * d, 16), torch.randn(2 * d, 16)],
    }
    for transform, hf in hf_sets.items():
        shards, expected = _roundtrip(transform, hf, args, tp)
        buffer = torch.cat([s.reshape(-1) for s in shards]).view(tp, -1)  # the stream's gathered rows
        in_buffer = [buffer[r].view(shards[r].shape) for r in range(tp)]
        got = transform.to_hf(in_buffer, ShardContext.create(args, 0, tp, vocab_divisible_by=8))
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g), type(transform).__name__
        if isinstance(transform, VocabSplit):
            assert got[0].data_ptr() == buffer.data_ptr()  # a view of the buffer: no copy


def test_join_rows_copies_only_what_is_not_end_to_end():
    buffer = torch.arange(24.0).view(4, 3, 2)
    adjacent = join_rows([buffer[0], buffer[1], buffer[2]])
    assert torch.equal(adjacent, buffer[:3].reshape(9, 2)) and adjacent.data_ptr() == buffer.data_ptr()
    # Each case below is contiguous memory with the wrong order or a gap: a view would be wrong.
    for parts in ([buffer[1], buffer[0]], [buffer[0], buffer[2]], [buffer[0, :2], buffer[1]]):
        joined = join_rows(parts)
        assert torch.equal(joined, torch.cat(parts)) and joined.data_ptr() != buffer.data_ptr()
    separate = [torch.randn(2, 2), torch.randn(3, 2)]
    assert torch.equal(join_rows(separate), torch.cat(separate))


def test_checkpoint_with_wrong_shapes_is_rejected():
    args = _args(vocab=50)
    ctx = ShardContext.create(args, 0, 1, vocab_divisible_by=8)
    with pytest.raises(
        MappingError, match=r"vocabulary rows: expected size 50 along dim 0, checkpoint has shape \(60, 16\)"
    ):
        VocabSplit().read_shard([torch.randn(60, 16)], ctx)
    with pytest.raises(MappingError, match="k_proj rows"):
        QKV().read_shard([torch.randn(32, 16), torch.randn(4, 16), torch.randn(8, 16)], ctx)


def test_weight_map_names():
    wm = WeightMap(_args(tie_word_embeddings=True))
    m = wm.resolve("decoder.layers.1.self_attention.linear_qkv.bias", layer_offset=4)
    assert m.megatron == "decoder.layers.5.self_attention.linear_qkv.bias"
    assert m.hf == tuple(f"model.layers.5.self_attn.{p}_proj.bias" for p in "qkv")
    assert wm.resolve("output_layer.weight").hf == ("model.embed_tokens.weight",)  # tied
    te = WeightMap(_args(), layer_spec="te")
    assert te.resolve("decoder.layers.0.mlp.linear_fc1.layer_norm_weight").hf == (
        "model.layers.0.post_attention_layernorm.weight",
    )
    with pytest.raises(MappingError, match="no HF mapping for Megatron parameter 'decoder.layers.0.foo'"):
        wm.resolve("decoder.layers.0.foo")


def _every_transform(args):
    """(transform, its HF source tensors) for every kind of parameter of a model of `args`."""
    d, h, kv = args.head_dim, args.hidden_size, args.num_kv_heads
    return [
        (QKV(), [torch.randn(args.num_attention_heads * d, h), torch.randn(kv * d, h), torch.randn(kv * d, h)]),
        (QKV(), [torch.randn(args.num_attention_heads * d), torch.randn(kv * d), torch.randn(kv * d)]),  # biases
        (GatedFC1(), [torch.randn(args.intermediate_size, h), torch.randn(args.intermediate_size, h)]),
        (VocabSplit(), [torch.randn(args.vocab_size, h)]),
        (RowSplit(), [torch.randn(h, args.intermediate_size)]),
        (Replicated(), [torch.randn(h)]),
    ]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("kv", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_shard_into_writes_what_read_shard_returns(tp, kv, dtype):
    """Loading writes each piece straight into the parameter (any dtype): the same values as the joined
    shard of read_shard (whose layout the tests above check), for every rank, KV replication included."""
    args = _args(kv=kv)
    for transform, hf in _every_transform(args):
        for rank in range(tp):
            ctx = ShardContext.create(args, rank, tp, vocab_divisible_by=8)
            expected = transform.read_shard(hf, ctx).to(dtype)
            out = torch.full_like(expected, float("nan"))
            transform.read_shard_into(hf, ctx, out)
            assert torch.equal(out, expected), (type(transform).__name__, rank)
            with pytest.raises(MappingError, match=r"checkpoint gives shape .* but the model expects"):
                transform.read_shard_into(hf, ctx, torch.empty(expected.shape[0] + 1, *expected.shape[1:]))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("kv", [1, 2, 8])
def test_to_hf_into_writes_the_hf_tensors(tp, kv):
    """The weight stream writes each bucket's HF tensors into memory it reuses: every HF source tensor
    comes back from its shards, KV replication included, with no value left from before."""
    args = _args(kv=kv)
    for transform, hf in _every_transform(args):
        ctxs = [ShardContext.create(args, r, tp, vocab_divisible_by=8) for r in range(tp)]
        shards = [transform.read_shard(hf, ctx) for ctx in ctxs]
        outs = [torch.full_like(t, float("nan")) for t in hf]
        transform.to_hf_into(shards, ctxs[0], outs)
        for source, out in zip(hf, outs, strict=True):
            assert torch.equal(out, source), (type(transform).__name__, tp, kv)
