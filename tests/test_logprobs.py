"""Vocab-parallel, chunked log-probs and entropy against a gathered float64 log_softmax.

Unit tests on plain tensors, then real megatron-core models at TP=1, TP=2 and
TP=2 with sequence parallelism: the values and every parameter gradient of the
chunked vocab-parallel function equal those of the gathered reference, in the
same process, and agree across layouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import build_model

from popo_megatron.algo.logprobs import vocab_parallel_logprobs
from popo_megatron.launch import run_local


def _reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int, temperature: float):
    z = logits[..., :vocab].double() / temperature
    log_probs = z.log_softmax(-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_rank_values_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 72, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 64, (3, 7), generator=gen)  # vocab 64 padded to 72
    coef_lp, coef_ent = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    ref_lp, ref_ent = _reference(logits, targets, 64, 0.7)
    (ref_grad,) = torch.autograd.grad((ref_lp * coef_lp + ref_ent * coef_ent).sum(), logits)
    results = []
    for chunk in (1, 5, 1000):
        lp, ent = vocab_parallel_logprobs(logits, targets, 64, temperature=0.7, chunk_tokens=chunk, with_entropy=True)
        (grad,) = torch.autograd.grad((lp * coef_lp + ent * coef_ent).sum(), logits)
        assert lp.dtype == torch.float32 and lp.shape == targets.shape
        assert torch.allclose(lp.double(), ref_lp, atol=1e-5), chunk
        assert torch.allclose(ent.double(), ref_ent, atol=2e-5), chunk
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(grad.double(), ref_grad.double(), atol=tolerance), chunk
        assert torch.all(grad[..., 64:] == 0), "padded vocabulary rows get no gradient"
        results.append((lp, ent, grad))
    for lp, ent, grad in results[1:]:  # chunking only changes the walk, not the arithmetic per token
        assert torch.equal(lp, results[0][0]) and torch.equal(ent, results[0][1]) and torch.equal(grad, results[0][2])


def test_log_probs_alone_and_odd_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 49, 10, 999])  # the last is outside the vocabulary (a masked padding position)
    lp, ent = vocab_parallel_logprobs(logits, targets, 50, chunk_tokens=3)
    assert ent is None and torch.isfinite(lp).all()
    ref_lp, _ = _reference(logits, targets[:3], 50, 1.0)
    assert torch.allclose(lp[:3].double(), ref_lp[:3], atol=1e-6)
    (grad,) = torch.autograd.grad(lp[:3].sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref_lp.sum(), logits)
    assert torch.allclose(grad, ref_grad.float(), atol=1e-6)


LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2_sp": (2, True)}


def _worker(hf: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.model.forward import forward_logits, gather_vocab
    from popo_megatron.weights import load_hf_weights

    hf = Path(hf)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(tokens, -1, dims=1)
    coef = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, (tp, sp) in LAYOUTS.items():
        parallel_state.destroy_model_parallel()
        model, args, cfg = build_model(hf, tp, 1, sequence_parallel=sp)
        load_hf_weights(model, str(hf), args, cfg)
        outputs, grads = {}, {}
        for method in ("chunked", "unchunked", "gathered"):

            def loss_fn(logits, method=method, vocab=args.vocab_size, outputs=outputs):
                if method == "gathered":
                    lp, ent = _reference(gather_vocab(logits), targets, vocab, 0.8)
                else:
                    chunk = 5 if method == "chunked" else 10_000
                    lp, ent = vocab_parallel_logprobs(
                        logits, targets, vocab, temperature=0.8, chunk_tokens=chunk, with_entropy=True
                    )
                outputs[method] = (lp.detach().double(), ent.detach().double())
                return (lp * coef).sum() + (ent * coef.flip(0)).sum()

            for param in model.parameters():
                param.grad = None
            forward_logits(model, tokens, loss_fn)
            grads[method] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for method in ("chunked", "unchunked"):
            for i, what in enumerate(("log-probs", "entropy")):
                diff = (outputs[method][i] - outputs["gathered"][i]).abs().max().item()
                assert diff < 1e-5, f"{name} {method}: {what} differ from the gathered reference by {diff}"
            for pname, grad in grads[method].items():
                diff = (grad - grads["gathered"][pname]).abs().max().item()
                assert diff < 1e-5, f"{name} {method}: gradient of {pname} differs by {diff}"
        assert torch.equal(outputs["chunked"][0], outputs["unchunked"][0]), f"{name}: chunking changed log-probs"
        results[name] = outputs["chunked"]
    if dist.get_rank() == 0:
        torch.save(results, out)


def test_vocab_parallel_log_probs_match_gathered_reference_at_every_layout(tiny_models, tmp_path):
    out = tmp_path / "results.pt"
    run_local(_worker, 2, str(tiny_models["qwen2.5_gqa1"]), str(out))
    results = torch.load(out, weights_only=True)
    for name in ("tp2", "tp2_sp"):
        for i in range(2):
            diff = (results[name][i] - results["tp1"][i]).abs().max().item()
            assert diff < 1e-4, f"{name} differs from tp1 by {diff}"
