"""Large synthetic HF checkpoints (fp32 noise) for the conversion and loading benchmarks and the memory tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_synthetic_hf_checkpoint(path: Path, size_gb: float, shard_bytes: float = 500e6) -> int:
    """Write an untied Qwen2 checkpoint of about `size_gb` (fp32 noise), in shards of `shard_bytes`,
    holding one shard in memory. Returns its size in bytes."""
    from safetensors.torch import save_file

    hidden, inter, heads, kv, vocab = 1024, 2816, 16, 2, 32000
    head_dim = hidden // heads
    per_layer = 4 * (2 * hidden * hidden + 2 * kv * head_dim * hidden + 3 * hidden * inter)
    layers = max(2, round((size_gb * 1e9 - 2 * 4 * vocab * hidden) / per_layer))
    layers += layers % 2
    config = dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        yield "lm_head.weight", (vocab, hidden)
        yield "model.norm.weight", (hidden,)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "post_attention_layernorm.weight", (hidden,)
            yield p + "self_attn.q_proj.weight", (hidden, hidden)
            yield p + "self_attn.q_proj.bias", (hidden,)
            for n in "kv":
                yield p + f"self_attn.{n}_proj.weight", (kv * head_dim, hidden)
                yield p + f"self_attn.{n}_proj.bias", (kv * head_dim,)
            yield p + "self_attn.o_proj.weight", (hidden, hidden)
            yield p + "mlp.gate_proj.weight", (inter, hidden)
            yield p + "mlp.up_proj.weight", (inter, hidden)
            yield p + "mlp.down_proj.weight", (hidden, inter)

    weight_map, shard, current_bytes, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, current_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name))
            weight_map.update({k: name for k in shard})
            shard, current_bytes, n = {}, 0, n + 1

    for name, shape in tensors():
        t = torch.randn(shape, generator=gen) * 0.02
        shard[name] = t
        current_bytes += t.numel() * 4
        total += t.numel() * 4
        if current_bytes > shard_bytes:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total
