"""Tiny random HF checkpoints of every supported architecture (saved in several shards)."""

from __future__ import annotations

from pathlib import Path

from popo_megatron.model.random_model import save_random_hf_model

COMMON = dict(
    vocab_size=1000,  # pads to 1024: exercises vocab padding
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
)

# A config.json of a small Qwen2, for tests that only parse configs (no weights).
QWEN2_CONFIG_JSON = dict(architectures=["Qwen2ForCausalLM"], **COMMON, num_key_value_heads=2)

# name -> (transformers config class, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    # Qwen2: QKV bias, tied embeddings (like Qwen2.5-0.5B/1.5B).
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen2.5 with one KV head: fewer query groups than TP=2 (KV heads replicated).
    "qwen2.5_gqa1": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3: qk-norm, no QKV bias, head_dim (32) != hidden / heads (16).
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # Llama 3.1 style: GQA, llama3 RoPE scaling.
    "llama": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=5e5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            max_position_embeddings=16384,
        ),
    ),
}


def save_tiny_model(name: str, out: Path, seed: int = 0) -> Path:
    config_class, extra = VARIANTS[name]
    return save_random_hf_model(out / name, config_class, seed, max_shard_size="200KB", **{**COMMON, **extra})
