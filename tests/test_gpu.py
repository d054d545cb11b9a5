"""Checks that need CUDA (marked `gpu`): run by scripts/device_check.sh on a GPU machine, skipped elsewhere.

That machine has megatron-core 0.19 (carried as a wheel), NCCL and the local layer spec, and neither
Transformer Engine nor vLLM, so these checks cover what runs without them:

- Megatron-Core's logits against transformers' at TP=1, fp32 and bf16, the model on the GPU;
- one POPO and one GRPO step (the twin swapped in for pi_old and the similarity penalty, the predictor, TIS)
  against the transformers reference, every gradient compared (test_popo_step's check on one GPU);
- the live weight stream's tensors equal to the HF checkpoint they were loaded from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from popo_megatron.launch import run_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/device_check.sh)"),
]

# bf16 logits of a 2-layer model: a few bf16 roundings (8 bits of mantissa) of values of size ~1 each layer.
BF16_RTOL = 3e-2


def _parity_worker(hf: str, dtype: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    from popo_megatron.config import load_config
    from popo_megatron.model.forward import forward_logits
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf}", f"model.params_dtype={dtype}"])
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    model, args = load_hf_model(cfg)
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = forward_logits(model, tokens)[0][..., : args.vocab_size].float().cpu()
        reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits
    diff = (logits - reference).abs().max().item()
    Path(out).write_text(json.dumps(dict(device=str(device), diff=diff, scale=reference.abs().max().item())))


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", BF16_RTOL)])
def test_logits_match_transformers_on_the_gpu(tiny_models, tmp_path, dtype, rtol):
    out = tmp_path / "parity.json"
    run_local(_parity_worker, 1, str(tiny_models["qwen2_tied"]), dtype, str(out))
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda"), f"the model was built on {result['device']}"
    assert result["diff"] <= rtol * max(1.0, result["scale"]), result


def test_popo_and_grpo_steps_match_the_reference_on_one_gpu(tiny_models):
    from test_popo_step import _layouts_worker

    run_local(_layouts_worker, 1, {"qwen2_tied": str(tiny_models["qwen2_tied"])}, {"gpu": (1, 1, False, 2)})


def _stream_worker(hf: str) -> None:
    from safetensors.torch import load_file

    from popo_megatron.config import load_config
    from popo_megatron.platform import init_model_parallel
    from popo_megatron.rollout.weight_stream import iter_hf_weights
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf}"])
    init_model_parallel(cfg.parallel)
    model, args = load_hf_model(cfg)
    assert next(model.parameters()).is_cuda
    expected = {}
    for shard in sorted(Path(hf).glob("*.safetensors")):
        expected.update(load_file(shard))
    streamed = {name: tensor.cpu() for name, tensor in iter_hf_weights(model, args, cfg, bucket_bytes=2**16)}
    assert set(streamed) == set(expected)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, expected[name]), f"{name} differs after the round trip through the GPU"


def test_weight_stream_gives_back_the_checkpoint_on_the_gpu(tiny_models):
    run_local(_stream_worker, 1, str(tiny_models["qwen2.5_gqa1"]))
