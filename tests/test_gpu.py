"""Checks that need CUDA (marked `gpu`): run by scripts/device_check.sh on a GPU machine, skipped elsewhere.

That machine has megatron-core 0.19 (carried as a wheel), NCCL and the local layer spec, and neither
Transformer Engine nor vLLM, so these checks cover what runs without them:

- Megatron-Core's logits against transformers' at TP=1, fp32 and bf16, the model on the GPU;
- one POPO and one GRPO step (the twin swapped in for pi_old and the similarity penalty, the predictor, TIS)
  against the transformers reference, every gradient compared (test_popo_step's check on one GPU), in
  padded micro-batches and packed ones (THD through the local spec's attention);
- the live weight stream's tensors equal to the HF checkpoint they were loaded from;
- a training checkpoint (weights, Adam state, twin; the twin on the GPU and in pinned host memory) saved
  on the GPU and loaded into a fresh model continues bit-identically.
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

    layouts = {"gpu": (1, 1, False, 2, None), "gpu_packed": (1, 1, False, 1, 24)}  # packed: THD, the local spec
    run_local(_layouts_worker, 1, {"qwen2_tied": str(tiny_models["qwen2_tied"])}, layouts)


def _stream_worker(hf: str, out: str) -> None:
    from safetensors.torch import load_file

    from popo_megatron.config import load_config
    from popo_megatron.platform import init_model_parallel
    from popo_megatron.rollout.weight_stream import iter_hf_weights
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf}"])
    init_model_parallel(cfg.parallel)
    model, args = load_hf_model(cfg)
    expected = {}
    for shard in sorted(Path(hf).glob("*.safetensors")):
        expected.update(load_file(shard))
    # A bucket's tensors share a buffer the next bucket reuses: copy each (on the CPU, .cpu() would not).
    streamed = {n: t.to("cpu", copy=True) for n, t in iter_hf_weights(model, args, cfg, bucket_bytes=2**16)}
    result = dict(
        device=str(next(model.parameters()).device),
        missing=sorted(set(expected) - set(streamed)),
        extra=sorted(set(streamed) - set(expected)),
        different=[n for n, t in streamed.items() if n in expected and not torch.equal(t, expected[n])],
    )
    Path(out).write_text(json.dumps(result))


def test_weight_stream_gives_back_the_checkpoint_on_the_gpu(tiny_models, tmp_path):
    out = tmp_path / "stream.json"
    run_local(_stream_worker, 1, str(tiny_models["qwen2.5_gqa1"]), str(out))
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda"), result
    assert not result["missing"] and not result["extra"] and not result["different"], result


def _resume_worker(hf: str, out: str, cpu_offload: bool) -> None:
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.checkpoint.training import Trained, load_training_checkpoint, save_training_checkpoint
    from popo_megatron.config import load_config
    from popo_megatron.model.forward import forward_logits
    from popo_megatron.model.training import build_optimizer, wrap_ddp
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf}", f"train.output_dir={out}"])
    init_model_parallel(cfg.parallel)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def build():
        seed_everything(0)
        model, args = load_hf_model(cfg)
        ddp = wrap_ddp(model, args, cfg)
        trained = Trained(model, build_optimizer(ddp, cfg), TwinParams(ddp, cpu_offload=cpu_offload), None, None)
        return args, ddp, trained

    def step(ddp, trained: Trained) -> None:
        ddp.zero_grad_buffer()
        trained.optimizer.zero_grad()
        forward_logits(ddp, tokens, loss_fn=lambda logits: logits.float().pow(2).mean())
        trained.optimizer.step()
        trained.twin.update(0.9)

    def state(trained: Trained) -> dict[str, torch.Tensor]:
        weights = {f"model.{n}": p.detach().cpu().clone() for n, p in trained.model.named_parameters()}
        return weights | {f"twin.{n}": t.cpu() for n, t in trained.twin.full_tensors().items()}

    args, ddp, first = build()
    step(ddp, first)
    ckpt = save_training_checkpoint(first, {"step": 1}, args, cfg)
    step(ddp, first)
    _, resumed_ddp, resumed = build()
    load_training_checkpoint(ckpt, resumed, args, cfg)
    step(resumed_ddp, resumed)
    expected, got = state(first), state(resumed)
    result = dict(
        device=str(next(first.model.parameters()).device),
        names=sorted(expected) == sorted(got),
        different=[name for name in expected if not torch.equal(expected[name], got.get(name, torch.empty(0)))],
    )
    (Path(out) / "resume.json").write_text(json.dumps(result))


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["twin_on_gpu", "twin_pinned_on_host"])
def test_save_and_exact_resume_on_the_gpu(tiny_models, tmp_path, cpu_offload):
    run_local(_resume_worker, 1, str(tiny_models["qwen2_tied"]), str(tmp_path / "run"), cpu_offload)
    result = json.loads((tmp_path / "run" / "resume.json").read_text())
    assert result["device"].startswith("cuda"), result
    assert result["names"] and not result["different"], f"after the resume these differ: {result['different'][:5]}"
