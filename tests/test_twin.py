"""The twin-parameter manager on real megatron-core (gloo), through real optimiser steps.

- After n steps the twin equals the closed-form EMA of the online parameters
  (computed here in float64 from the recorded parameters and momenta).
- Swapping the twin in puts exactly the twin's weights in the model (all-gathered
  across data-parallel slices) and swapping out restores the online weights bit
  for bit.
- The data-parallel-sliced twin (distributed optimiser) equals the unsliced one.
- Saved at TP=2, the twin reloads at TP=1 (and exports to HF) unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import build_model, perturb

from popo_megatron.launch import run_local

STEPS = 3
EMA_TOL = 1e-6


def _batch():
    from popo_megatron.algo.advantages import popo_weights
    from popo_megatron.algo.batch import make_policy_batch

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (4,), generator=gen).tolist() for _ in range(8)]
    responses = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in (3, 5, 2, 4, 6, 1, 3, 2)]
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    return make_policy_batch(prompts, responses, popo_weights(rewards > 0, "uniform"), rewards > 0, length_multiple=2)


def _train(hf: Path, tp: int, distributed_optimizer: bool, record: bool):
    """STEPS steps of the paper's POPO with its EMA target (here under the adaptive law, so that the momentum
    changes); returns the model, the target and the history."""
    from megatron.core import parallel_state

    from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.model.training import build_optimizer, wrap_ddp
    from popo_megatron.objectives import ObjectiveContext, build_objective
    from popo_megatron.weights import load_hf_weights

    parallel_state.destroy_model_parallel()
    overrides = (
        f"optim.use_distributed_optimizer={distributed_optimizer}",
        "optim.lr=1e-3",
        "optim.ddp_bucket_size=4000",  # several buckets, so parameters straddle data-parallel slices
        "popo.alpha=0.5",
        "popo.predictor.hidden=16",
        "popo.target.tau=0.8",  # a fast target: visible movement in three steps
        "popo.target.schedule=adaptive",
        "popo.target.adaptive.m_min=0.5",
    )
    model, args, cfg = build_model(hf, tp, 1, overrides=overrides)
    load_hf_weights(model, str(hf), args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    optimizer = build_optimizer(ddp, cfg)
    context = ObjectiveContext(cfg.loss, cfg.optim, args.vocab_size, args.hidden_size, 1.0, 0, STEPS, 4, 1, False)
    objective = build_objective(cfg, context, ddp)
    forwards = Forwards(ddp, LogprobSettings(args.vocab_size, 1.0, 1024), 2)
    full = _batch()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = full.size // dp
    mine = full[dp_rank * rows : (dp_rank + 1) * rows]
    history = {"params": [], "momenta": []}
    if record:
        history["params"].append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    for step in range(STEPS):
        batch, _ = objective.prepare(full, mine, forwards, MetricAccumulator())
        mini = objective.mini_context(batch, float(full.response_lengths().sum()), 8.0, forwards, step + 1)
        metrics = MetricAccumulator()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            ddp,
            mini.micro_batches,
            lambda i, mb, lg, h, c=mini, mt=metrics: objective.loss(i, mb, lg, h, c, mt),
            True,
        )
        assert optimizer.step()[0]
        history["momenta"].append(objective.momentum.value)
        objective.after_update(True, metrics)
        if record:
            history["params"].append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return model, ddp, objective.target, args, cfg, history


def _closed_form_ema(history: dict) -> dict[str, torch.Tensor]:
    """twin_n = prod_k m_k theta_0 + sum_k (1 - m_k) prod_{j > k} m_j theta_{k+1}, from the recorded steps."""
    params, momenta = history["params"], history["momenta"]
    result = {}
    for name in params[0]:
        value = params[0][name].clone()
        for k, m in enumerate(momenta):
            value = m * value + (1 - m) * params[k + 1][name]
        result[name] = value
    return result


def _sliced_worker(hf: str, out: str) -> None:
    import torch.distributed as dist
    from model_helpers import save_model_weights

    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.rollout.weight_stream import iter_hf_weights

    hf = Path(hf)
    model, ddp, twin, args, cfg, history = _train(hf, 1, distributed_optimizer=True, record=True)
    assert twin.sliced
    # Closed form: the recursion written out over the recorded parameters, in float64.
    expected = _closed_form_ema(history)
    full = twin.full_tensors()
    assert history["momenta"][0] != history["momenta"][-1], "the adaptive law moved the momentum"
    for name, value in expected.items():
        diff = (full[name].double() - value).abs().max().item()
        assert diff < EMA_TOL, f"twin of {name} differs from the closed-form EMA by {diff}"
        assert not torch.equal(full[name].double(), history["params"][-1][name]), f"{name}: twin == online"
    # Memory: this data-parallel rank's slice only (half of the buffers, padding included).
    buffer_numel = sum(b.param_data.numel() for b in ddp.buffers)
    assert twin.numel == buffer_numel // 2 and twin.nbytes == twin.numel * 4

    online = {n: p.detach().clone() for n, p in model.named_parameters()}
    with twin.swapped_in():
        for name, param in model.named_parameters():
            assert torch.equal(param, full[name]), f"{name}: the model does not hold the twin inside the swap"
        twin_stream = {k: v.clone() for k, v in iter_hf_weights(ddp, args, cfg)}
    for name, param in model.named_parameters():
        assert torch.equal(param, online[name]), f"{name}: online weights not restored bit for bit"

    # A bf16, CPU-offloaded twin (the cast path of the EMA) follows an fp32 one within bf16 rounding.
    low, high = TwinParams(ddp, dtype=torch.bfloat16, cpu_offload=True), TwinParams(ddp)
    assert low.nbytes == high.nbytes // 2 and low.device == torch.device("cpu")
    perturb(model)
    low.update(0.7)
    high.update(0.7)
    for name, value in high.full_tensors().items():
        assert torch.allclose(low.full_tensors()[name].float(), value, rtol=1e-2, atol=1e-3), name

    # The unsliced twin of the same run (plain DDP), for the comparison in the test.
    model_u, ddp_u, twin_u, *_ = _train(hf, 1, distributed_optimizer=False, record=False)
    assert not twin_u.sliced and twin_u.numel == sum(p.numel() for p in model_u.parameters())
    unsliced = twin_u.full_tensors()

    # TP=2: save policy and twin, and the twin's HF stream, for the reload at TP=1.
    model2, ddp2, twin2, args2, cfg2, _ = _train(hf, 2, distributed_optimizer=True, record=False)
    save_model_weights(model2, Path(out) / "ckpt_tp2", args2, cfg2, hf, twin=twin2)
    _save_trained_predictors(args2.hidden_size, Path(out) / "predictor_tp2")
    with twin2.swapped_in():
        tp2_stream = {k: v.clone() for k, v in iter_hf_weights(ddp2, args2, cfg2)}
    if dist.get_rank() == 0:
        torch.save(
            {"sliced": full, "unsliced": unsliced, "stream": twin_stream, "tp2_stream": tp2_stream},
            Path(out) / "twins.pt",
        )


def _heads(hidden_size: int):
    """The two predictor heads: the paper's MLP (pooled features) and ours, the per-token linear one (SP)."""
    from popo_megatron.algo.predictor import LinearPredictor, MLPPredictor

    return {"mlp": MLPPredictor(hidden_size, 16, 3, seed=5), "linear": LinearPredictor(hidden_size, True)}


def _save_trained_predictors(hidden_size: int, out: Path) -> None:
    """One AdamW step of each predictor head at TP=2, saved in a Megatron checkpoint."""
    from megatron.core import dist_checkpointing

    from popo_megatron.algo.predictor import build_head_optimizer
    from popo_megatron.config import load_config

    optim = load_config(overrides=["model.hf_path=/x"]).optim
    expected = {}
    for name, head in _heads(hidden_size).items():
        optimizer = build_head_optimizer(head, 0.01, optim)
        start = [p.detach().clone() for p in head.parameters()]
        # The linear head under SP sees its rank's slice of the sequence (summed over TP); the MLP reads pooled
        # features, the same on every TP rank.
        seed = torch.distributed.get_rank() if head.tp_partial else 0
        h = torch.randn(6, hidden_size, generator=torch.Generator().manual_seed(seed))
        head(h).square().sum().backward()
        head.finish_grad_sync()
        optimizer.step()
        assert any(not torch.equal(p, s) for p, s in zip(head.parameters(), start, strict=True))
        (out / name).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(head.sharded_state_dict(), str(out / name))
        expected[name] = {k: v.detach() for k, v in head.state_dict().items()}
    if torch.distributed.get_rank() == 0:
        torch.save(expected, out.parent / "predictor_expected.pt")


def _reload_worker(hf: str, out: str) -> None:
    from model_helpers import load_twin_weights

    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.model.forward import unwrap_model
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.rollout.weight_stream import iter_hf_weights
    from popo_megatron.weights import load_hf_weights

    model, args, cfg = build_model(Path(hf), 1, 1)
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    twin = TwinParams(ddp)
    load_twin_weights(twin, Path(out) / "ckpt_tp2", args, cfg)
    with twin.swapped_in():
        torch.save({k: v.clone() for k, v in iter_hf_weights(ddp, args, cfg)}, Path(out) / "tp1_stream.pt")

    # The predictor heads, trained and saved at TP=2 (the linear one with sequence parallelism), reload at TP=1.
    from megatron.core import dist_checkpointing

    expected = torch.load(Path(out) / "predictor_expected.pt", weights_only=True)
    for name, head in _heads(args.hidden_size).items():
        loaded = dist_checkpointing.load(head.sharded_state_dict(), str(Path(out) / "predictor_tp2" / name))
        for key, tensor in expected[name].items():
            assert torch.equal(loaded[f"predictor.{key}"], tensor), f"{name} predictor {key} changed"

    # FP8: the swap marks Transformer Engine's cached FP8 weights stale on both sides (Megatron's
    # set_is_first_microbatch). No TE on CPU: modules carrying TE's flag stand in for TE layers.
    inner = unwrap_model(ddp)
    flagged = [m for m in inner.modules() if hasattr(m, "linear_qkv")]
    for module in flagged:
        module.is_first_microbatch = False
    inner.config.fp8 = "hybrid"
    try:
        with twin.swapped_in():
            assert all(m.is_first_microbatch for m in flagged), "entering the swap must refresh FP8 caches"
            for module in flagged:
                module.is_first_microbatch = False
        assert all(m.is_first_microbatch for m in flagged), "leaving the swap must refresh FP8 caches"
    finally:
        inner.config.fp8 = None


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("twin")
    run_local(_sliced_worker, 2, str(tiny_models["qwen2_tied"]), str(out))
    return out


def test_sliced_twin_equals_unsliced(trained):
    twins = torch.load(trained / "twins.pt", weights_only=True)
    for name, value in twins["unsliced"].items():
        diff = (twins["sliced"][name] - value).abs().max().item()
        assert diff < EMA_TOL, f"{name}: DP-sliced twin differs from the unsliced one by {diff}"


def test_twin_saved_at_tp2_reloads_at_tp1(trained, tiny_models):
    from test_convert import assert_bit_exact, hf_tensors

    from popo_megatron.checkpoint.format import read_checkpoint
    from popo_megatron.convert.offline import mcore_to_hf

    info, _ = read_checkpoint(trained / "ckpt_tp2")
    assert info.weights == ["model", "twin"]
    run_local(_reload_worker, 1, str(tiny_models["qwen2_tied"]), str(trained))
    tp2 = torch.load(trained / "twins.pt", weights_only=True)["tp2_stream"]
    assert_bit_exact(torch.load(trained / "tp1_stream.pt", weights_only=True), tp2, "twin reloaded at TP=1")
    # The offline exporter reads the same twin.
    mcore_to_hf(trained / "ckpt_tp2", trained / "twin_hf", weights="twin", progress=False)
    assert_bit_exact(hf_tensors(trained / "twin_hf"), tp2, "exported twin")
    source = hf_tensors(tiny_models["qwen2_tied"])
    assert not torch.equal(tp2["model.norm.weight"], source["model.norm.weight"]), "the twin moved from the start"
