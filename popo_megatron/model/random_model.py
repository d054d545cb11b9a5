"""Randomly initialised Hugging Face models made offline: the main job's initial model
(data/synthetic.py) and `popo parity`'s default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A Qwen2-shaped model small enough for a 2-core CPU. head_dim 64 because vLLM's
# CPU attention kernel does not support head_dim below 32.
TINY_QWEN2 = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
    rope_theta=1e6,
    tie_word_embeddings=True,
)


def save_random_hf_model(
    path: str | Path, config_class: str = "Qwen2Config", seed: int = 0, max_shard_size: str = "5GB", **config: Any
) -> Path:
    """Save a randomly initialised fp32 transformers model (safetensors) to `path`.

    Norm weights are drawn from U(0.5, 1.5) instead of all ones, so that a
    mapping that confuses two norms cannot go unnoticed in parity checks.
    """
    import transformers

    hf_config = getattr(transformers, config_class)(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path
