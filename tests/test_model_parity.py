"""HF transformers vs our Megatron-Core models: logits and gradients at every layout.

Real megatron-core over gloo, multi-process. The reference is an independent
implementation (transformers' own forward/backward of the same checkpoint).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from popo_megatron.launch import run_local

LAYOUTS = {
    "tp1": dict(tp=1, pp=1, sp=False, world=1),
    "tp2": dict(tp=2, pp=1, sp=False, world=2),
    "tp2_sp": dict(tp=2, pp=1, sp=True, world=2),
    "pp2": dict(tp=1, pp=2, sp=False, world=2),
    "tp2_pp2": dict(tp=2, pp=2, sp=False, world=4),
}
LOGIT_TOL = 1e-4
GRAD_TOL = 1e-4


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1, :vocab].reshape(-1, vocab), tokens[:, 1:].reshape(-1))


def _worker(tp: int, pp: int, sp: bool, model_dirs: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.forward import forward_logits, gather_vocab
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    for name, path in model_dirs.items():
        cfg = load_config(
            overrides=[
                f"model.hf_path={path}",
                f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.pipeline_model_parallel_size={pp}",
                f"parallel.sequence_parallel={sp}",
            ]
        )
        args = read_hf_config(path)
        validate_config(cfg, dist.get_world_size(), args)
        init_model_parallel(cfg.parallel)
        seed_everything(0)
        model = build_gpt_model(args, cfg)
        load_hf_weights(model, str(path), args, cfg)
        ddp = wrap_ddp(model, args, cfg)

        tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf_logits = hf(tokens).logits
        _next_token_loss(hf_logits, tokens, args.vocab_size).backward()

        logits = forward_logits(
            ddp, tokens, loss_fn=lambda lg, t=tokens, v=args.vocab_size: _next_token_loss(gather_vocab(lg), t, v)
        )
        where = f"{name} at TP={tp} PP={pp} SP={sp}"
        if parallel_state.is_pipeline_last_stage():
            diff = (logits[0][..., : args.vocab_size] - hf_logits.detach()).abs().max().item()
            assert diff < LOGIT_TOL, f"{where}: logits differ from transformers by {diff}"
            padded = logits[0][..., args.vocab_size :]
            assert torch.all(padded == 0), f"{where}: padded vocab rows must produce zero logits"

        # Each rank's gradient shard equals the matching slice of transformers' gradient.
        hf_grads = {n: p.grad for n, p in hf.named_parameters()}
        checked = 0
        for pname, param, expected in iter_megatron_shards(model, hf_grads, args, cfg):
            got = param.main_grad
            diff = (got - expected).abs().max().item()
            assert diff < GRAD_TOL, f"{where}: gradient of {pname} differs from transformers by {diff}"
            checked += 1
        assert checked == len(list(model.parameters()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_grads_match_transformers(layout, tiny_models):
    spec = LAYOUTS[layout]
    run_local(_worker, spec["world"], spec["tp"], spec["pp"], spec["sp"], dict(tiny_models))
