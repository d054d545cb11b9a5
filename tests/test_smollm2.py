"""A real pretrained model: SmolLM2-135M-Instruct (Llama, tied embeddings, 9 heads / 3 KV heads, vocab 49152),
built from the GGUF on PyPI by `popo pretrained` (cached across runs, see popo_megatron/model/pretrained.py).

- HF -> Megatron (TP=3 x PP=2) -> HF returns every tensor bit for bit.
- Megatron-Core's logits match transformers' at TP=1, TP=3 and PP=2.
"""

from __future__ import annotations

import json

import pytest
from test_convert import assert_bit_exact, hf_tensors

from popo_megatron.convert.offline import hf_to_mcore, mcore_to_hf
from popo_megatron.parity import parity_tolerance, parse_layout, run_parity


@pytest.fixture(scope="session")
def smollm2():
    from popo_megatron.model.pretrained import build_smollm2

    return build_smollm2(progress=False)


def test_the_built_model_is_smollm2_with_its_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    shape = [config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")]
    assert shape == [30, 576, 9, 3] and config["vocab_size"] == 49152
    assert "quantization_config" not in config, "a plain fp32 checkpoint"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    assert "<|im_start|>user" in prompt and tokenizer.eos_token == "<|im_end|>"


def test_round_trip_through_megatron_tp3_pp2_is_bit_exact(smollm2, tmp_path):
    source = hf_tensors(smollm2)
    hf_to_mcore(smollm2, tmp_path / "mcore", tp=3, pp=2, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "hf", progress=False)
    assert_bit_exact(hf_tensors(tmp_path / "hf"), source, "SmolLM2 round trip")


def test_megatron_logits_match_transformers(smollm2):
    results = run_parity(smollm2, [parse_layout(name) for name in ("tp1", "tp3", "pp2")])
    for result in results:  # fp32: within 1e-5 of the logits' size (~20 here), see popo_megatron/parity.py
        assert result["max_abs_diff"] < parity_tolerance(result), result
        assert result["max_abs_logit"] > 1.0, "a real model's logits, not a degenerate forward"
