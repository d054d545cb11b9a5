"""A real pretrained model: SmolLM2-135M-Instruct (Llama, tied embeddings, 9 heads / 3 KV heads, vocab 49152),
built from the GGUF on PyPI by `popo pretrained` (cached across runs, see popo_megatron/model/pretrained.py).

- HF -> Megatron (TP=3 x PP=2) -> HF returns every tensor bit for bit.
- Megatron-Core's logits match transformers' at TP=1, TP=3 and PP=2.
- After a weight sync, vLLM's log-probs match Megatron's on chat-formatted prompts, with EOS as the stop.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_convert import assert_bit_exact, hf_tensors

from popo_megatron.convert.offline import hf_to_mcore, mcore_to_hf
from popo_megatron.parity import parity_tolerance, parse_layout, run_parity

TEMPERATURE = 0.8
MAX_TOKENS = 24
LOGPROB_TOLERANCE = 2e-4  # fp32 vLLM vs Megatron, 30 layers (measured: 3.5e-5)


@pytest.fixture(scope="session")
def smollm2():
    from popo_megatron.model.pretrained import build_smollm2

    return build_smollm2(progress=False)


def test_the_built_model_is_smollm2_with_its_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    shape = [config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")]
    assert shape == [30, 576, 9, 3] and config["vocab_size"] == 49152
    from public_shapes import PUBLIC_SHAPES

    public = PUBLIC_SHAPES["smollm2-135m-instruct"]  # what the example configs are validated against
    assert {k: config[k] for k in public} == public
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


def _vllm_worker(hf: str, out: str) -> None:
    from pathlib import Path

    from model_helpers import build_model, perturb
    from transformers import AutoTokenizer

    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.step import LogprobSettings, forward_only
    from popo_megatron.data.prompts import render_prompt
    from popo_megatron.rollout.engine import SamplingSettings
    from popo_megatron.rollout.vllm_engine import vllm_engine
    from popo_megatron.rollout.weight_stream import iter_hf_weights
    from popo_megatron.weights import load_hf_weights

    overrides = ("rollout.max_model_len=256", "rollout.kv_cache_memory_mb=64")
    model, args, cfg = build_model(Path(hf), 1, 1, overrides=overrides)
    load_hf_weights(model, hf, args, cfg)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    engine = vllm_engine(cfg, hf)
    try:
        perturb(model, scale=0.002)  # the trainer has moved on: the engine must serve the synced weights
        engine.update_weights(iter_hf_weights(model, args, cfg))
        questions = ["What is 2+2?", "What is 7*8?", "What is 17+25?"]
        prompts = [render_prompt(q, tokenizer, None, "Answer with the number only.") for q in questions]
        sampling = SamplingSettings(n=4, temperature=TEMPERATURE, top_p=1.0, max_tokens=MAX_TOKENS, top_k=0)
        generation = engine.generate(prompts, sampling, seed=3)
        responses = [r for group in generation.responses for r in group]
        for r in responses:  # EOS ends a response and is part of it; otherwise the length limit did
            if r.finish_reason == "stop":
                assert r.token_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in r.token_ids[:-1]
            else:
                assert len(r.token_ids) == MAX_TOKENS and tokenizer.eos_token_id not in r.token_ids
        tokens, mask = pack_rows([p for p in prompts for _ in range(sampling.n)], [r.token_ids for r in responses])
        batch = PolicyBatch(tokens, mask, torch.zeros(len(responses)), torch.zeros(len(responses), dtype=torch.bool))
        settings = LogprobSettings(args.vocab_size, TEMPERATURE, cfg.loss.logprob_chunk_tokens)
        trainer = forward_only(model, [batch], settings)[0].logprobs[mask]
        served = torch.tensor([lp for r in responses for lp in r.logprobs])
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
        torch.save(
            {
                "diff": (served - trainer).abs().max().item(),
                "stops": [r.finish_reason for r in responses],
                "texts": texts,
            },
            out,
        )
    finally:
        engine.shutdown()


def test_vllm_serves_the_synced_weights_on_chat_prompts(smollm2, tmp_path):
    """After a weight sync, vLLM's log-probs of its own samples (real tokenizer, chat template, EOS as the stop
    token) equal the Megatron model's."""
    from popo_megatron.launch import run_local

    out = tmp_path / "vllm.pt"
    run_local(_vllm_worker, 1, str(smollm2), str(out))
    result = torch.load(out, weights_only=True)
    assert result["diff"] < LOGPROB_TOLERANCE, result
    assert "stop" in result["stops"], f"no response ended on EOS: {result['texts']}"
