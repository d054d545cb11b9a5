"""What the project needs to know about a Hugging Face checkpoint, read from config.json.

Only config.json is parsed (no code from the checkpoint is executed). Each
supported architecture is a row of ARCHITECTURES; anything else fails here with
a message that says what is supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo_megatron.errors import UserError


class UnsupportedModelError(UserError):
    """The checkpoint's architecture or one of its options is not supported."""


@dataclass(frozen=True)
class ArchTraits:
    family: str
    qkv_bias_key: str | None  # config key that switches the QKV bias on; None: always on
    qkv_bias_default: bool
    qk_norm: bool


# HF `architectures[0]` -> how that family differs from a plain Llama block.
ARCHITECTURES: dict[str, ArchTraits] = {
    # Qwen2 and Qwen2.5 share the class: QKV bias, no qk-norm.
    "Qwen2ForCausalLM": ArchTraits("qwen2", qkv_bias_key=None, qkv_bias_default=True, qk_norm=False),
    # Qwen3: RMSNorm on each query/key head, no QKV bias (attention_bias=false).
    "Qwen3ForCausalLM": ArchTraits("qwen3", "attention_bias", qkv_bias_default=False, qk_norm=True),
    "LlamaForCausalLM": ArchTraits("llama", "attention_bias", qkv_bias_default=False, qk_norm=False),
}


@dataclass(frozen=True)
class HFModelArgs:
    """The architecture-defining fields of an HF config, normalised across families."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    # Llama-3.1 style frequency scaling: None or the scaling factor.
    llama3_rope_scaling_factor: float | None


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise UnsupportedModelError(f"{where}: missing key {key!r}")
    return cfg[key]


def parse_hf_config(cfg: dict[str, Any], where: str = "config.json") -> HFModelArgs:
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architectures={archs!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    arch = archs[0]
    traits = ARCHITECTURES[arch]
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if cfg.get("mlp_bias", False):
        raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window", False):
        raise UnsupportedModelError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    layer_types = set(cfg.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(f"{where}: layer_types {sorted(layer_types)}: only full attention is supported")
    # transformers >= 5 writes `rope_parameters` (theta and scaling together);
    # older checkpoints (most on the Hub) have `rope_theta` and `rope_scaling`.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    llama3_factor = None
    if kind == "llama3" and traits.family == "llama":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in expected.items():
            if rope.get(k, v) != v:
                raise UnsupportedModelError(f"{where}: rope {k}={rope[k]!r}; only {v!r} is supported")
        llama3_factor = float(rope.get("factor", 8.0))
    elif kind != "default":
        raise UnsupportedModelError(f"{where}: rope scaling of type {kind!r} is not supported")

    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    head_dim = cfg.get("head_dim") or hidden // heads
    qkv_bias = (
        traits.qkv_bias_default
        if traits.qkv_bias_key is None
        else bool(cfg.get(traits.qkv_bias_key, traits.qkv_bias_default))
    )
    return HFModelArgs(
        architecture=arch,
        family=traits.family,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=rope_theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=traits.qk_norm,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        llama3_rope_scaling_factor=llama3_factor,
    )


def read_hf_config(hf_path: str | Path) -> HFModelArgs:
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: not found (model.hf_path must be a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{path}: not valid JSON: {exc}") from exc
    return parse_hf_config(cfg, where=str(path))
