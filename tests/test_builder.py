"""HF config -> Megatron TransformerConfig translation (no process group needed).

The FP8 case is the CPU-side check of GPU-only settings: TransformerConfig
accepts them here; Transformer Engine itself only runs on a GPU (not run yet).
"""

from __future__ import annotations

import torch
from tiny_models import QWEN2_CONFIG_JSON

from popo_megatron.config import load_config
from popo_megatron.model.builder import make_transformer_config
from popo_megatron.model.hf_config import parse_hf_config

BASE = {**QWEN2_CONFIG_JSON, "rms_norm_eps": 1e-5}


def _config(hf: dict, *overrides: str):
    cfg = load_config(overrides=["model.hf_path=x", *overrides])
    return make_transformer_config(parse_hf_config(hf), cfg.model, cfg.parallel)


def test_qwen3_traits():
    c = _config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert c.qk_layernorm and not c.add_qkv_bias
    assert c.kv_channels == 32 and c.num_query_groups == 2
    assert c.layernorm_epsilon == 1e-5 and c.normalization == "RMSNorm" and c.gated_linear_unit
    assert c.hidden_dropout == 0 and c.attention_dropout == 0


def test_qwen2_bias_and_kv_replication_at_tp4():
    c = _config({**BASE, "architectures": ["Qwen2ForCausalLM"]}, "parallel.tensor_model_parallel_size=4")
    assert c.add_qkv_bias and not c.qk_layernorm
    assert c.num_query_groups == 4  # 2 KV heads, each replicated on 2 of the 4 TP ranks


def test_fp8_settings_reach_transformer_config():
    c = _config(
        {**BASE, "architectures": ["LlamaForCausalLM"]},
        "model.params_dtype=bfloat16",
        "model.fp8.enabled=true",
        "model.fp8.format=e4m3",
        "model.fp8.recipe=tensorwise",
        "model.fp8.amax_history_len=16",
        "model.fp8.amax_compute_algo=most_recent",
        "model.fp8.fp8_weights=true",
    )
    assert (c.fp8, c.fp8_recipe, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (
        "e4m3",
        "tensorwise",
        16,
        "most_recent",
    )
    assert c.fp8_param and c.bf16 and c.params_dtype == torch.bfloat16
    assert type(c.fp8) is str  # plain strings, not the config's Enum members


def test_fp8_off_by_default():
    assert _config({**BASE, "architectures": ["LlamaForCausalLM"]}).fp8 is None


def _tp_attribute_worker(hf: str) -> None:
    """At TP=2 exactly the parameters whose shape is split by TP carry `tensor_model_parallel`, with the dim
    along which they are split (megatron's gradient-norm and optimiser code rely on it)."""
    from pathlib import Path

    from megatron.core import parallel_state
    from model_helpers import build_model

    whole = {n: p.shape for n, p in build_model(Path(hf), 1, 1)[0].named_parameters()}
    parallel_state.destroy_model_parallel()
    split = dict(build_model(Path(hf), 2, 1)[0].named_parameters())
    assert sorted(split) == sorted(whole)
    for name, param in split.items():
        dims = [d for d, (a, b) in enumerate(zip(param.shape, whole[name], strict=True)) if a != b]
        if dims:
            assert getattr(param, "tensor_model_parallel", False), f"{name} is split by TP but not marked"
            assert param.partition_dim == dims[0], f"{name}: split along {dims[0]}, marked {param.partition_dim}"
        else:
            assert not getattr(param, "tensor_model_parallel", False), f"{name} is whole but marked TP-split"


def test_tensor_parallel_weights_are_marked(tiny_models):
    from popo_megatron.launch import run_local

    run_local(_tp_attribute_worker, 2, str(tiny_models["qwen2_tied"]))
