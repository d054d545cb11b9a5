"""The POPO and GRPO training step on real megatron-core, against transformers as the reference.

Every layout (TP=1 with 1 and 4 micro-batches, TP=2, TP=2 with sequence
parallelism, DP=2 sharing the global batch, PP=2) computes one step's loss and
gradients with the project's code: the twin swapped in for pi_old and its
hidden states, the vocab-parallel log-probs, the micro-batch loss shares. The
reference computes the same global loss with transformers' forward and plain
torch written here, and its gradients with autograd; every gradient shard of
every rank must match. So the loss and gradients are equal across TP (SP on
and off), micro-batch counts, DP and PP by transitivity.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import build_model, config_for, perturb

from popo_megatron.launch import run_local

TEMPERATURE = 0.9
GRAD_TOL = 1e-4
LOSS_TOL = 1e-5
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])  # two groups of G = 4
CASES = {
    # POPO with every switch that changes the gradient: clip, similarity through a trained linear
    # predictor, TIS against engine log-probs.
    "popo_clip": [
        "popo.loss_normalizer=positive_tokens",
        "popo.redistribution=success_scaled",
        "popo.similarity.beta=0.5",
        "popo.similarity.predictor=linear",
        "popo.rollout_correction=tis",
        "popo.tis_cap=1.5",
    ],
    "popo_truncate": [
        "popo.loss_normalizer=all_tokens",
        "popo.is_bound.mode=truncate",
        "popo.redistribution=uniform",
        "popo.similarity.beta=0.1",
    ],
    "grpo": ["algorithm=grpo", "grpo.kl_beta=0.05"],
}


def _rows():
    gen = torch.Generator().manual_seed(7)
    prompt_lengths = torch.randint(2, 6, (8,), generator=gen).tolist()
    prompts = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in prompt_lengths]
    lengths = [5, 3, 0, 6, 4, 2, 6, 1]  # row 2: a positive with an empty response
    responses = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in lengths]
    return prompts, responses


def _engine_logprobs(old: torch.Tensor) -> torch.Tensor:
    """Stand-in for the rollout engine's log-probs: pi_old with a deterministic numerical mismatch."""
    return old - 0.2 * torch.sin(old * 13.0)


def _hf_reference(hf: Path, name: str, cfg, tokens, mask, weights, positive, advantages) -> dict:
    """The global loss of the whole batch and its gradients, with transformers and plain torch."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    online = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    perturb(online)
    vocab = twin.config.vocab_size
    targets = F.pad(tokens[:, 1:], (0, 1))

    def target_logprobs(logits):
        return (logits[..., :vocab] / TEMPERATURE).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        twin_out = twin(tokens, output_hidden_states=True)
        old = target_logprobs(twin_out.logits)
    out = online(tokens, output_hidden_states=True)
    lp = target_logprobs(out.logits)
    predictor = None
    if cfg.popo.similarity.predictor == "linear":
        hidden = out.hidden_states[-1].shape[-1]
        predictor = torch.nn.Linear(hidden, hidden)
        with torch.no_grad():
            predictor.weight.copy_(torch.eye(hidden))
            predictor.bias.zero_()
    ratio = torch.exp(lp - old)
    if cfg.algorithm == "popo":
        bound = cfg.popo.is_bound
        if bound.mode == "clip":
            surrogate = torch.clamp(ratio, max=1 + bound.eps_high)
        else:
            surrogate = torch.clamp(ratio, max=bound.truncate_c).detach() * lp
        if cfg.popo.rollout_correction == "tis":
            surrogate = surrogate * torch.clamp(torch.exp(old - _engine_logprobs(old)), max=cfg.popo.tis_cap)
        active = mask & (weights > 0)[:, None]
        numerator = (weights[:, None] * torch.where(active, surrogate, 0.0)).sum()
        if cfg.popo.loss_normalizer == "all_tokens":  # every rollout's response tokens, negatives included
            loss = -numerator / mask.sum()
        else:  # sum_i w_i |o_i| over the positives
            loss = -numerator / (weights * mask.sum(-1)).sum()
        sim_mask = mask & positive[:, None]
        h = out.hidden_states[-1]
        g = predictor(h) if predictor is not None else h
        distance = 1 - F.cosine_similarity(g, twin_out.hidden_states[-1], dim=-1)
        loss = loss + cfg.popo.similarity.beta * torch.where(sim_mask, distance, 0.0).sum() / sim_mask.sum()
    else:
        adv = advantages[:, None]
        per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.grpo.eps_low, 1 + cfg.grpo.eps_high))
        x = old - lp  # the reference policy is the initial (twin) weights
        per_token = per_token + cfg.grpo.kl_beta * (torch.exp(x) - x - 1)
        loss = torch.where(mask, per_token, 0.0).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in online.named_parameters()}
    if predictor is not None:
        grads.update({f"predictor.{n}": p.grad for n, p in predictor.named_parameters()})
    mismatch = torch.where(mask, (old - _engine_logprobs(old)).abs(), 0.0).max().item()
    return {"loss": loss.item(), "grads": grads, "name": name, "mismatch_max": mismatch}


def _step_case(hf: Path, case: str, tp: int, pp: int, sp: bool, microbatches: int, where: str) -> None:
    """One POPO / GRPO step at this layout, checked against the transformers reference."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.algo.advantages import grpo_advantages, popo_weights
    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.predictor import SimilarityPredictor
    from popo_megatron.algo.step import LossSettings, forward_backward, forward_only, loss_normalizers
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.config.schema import Algorithm
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    parallel_state.destroy_model_parallel()
    # With the distributed optimiser each data-parallel rank holds the reduced gradient of its own slice only;
    # plain DDP all-reduces, so every gradient can be compared. (The sliced twin is tested in test_twin.py.)
    overrides = (*CASES[case], f"optim.use_distributed_optimizer={dist.get_world_size() == tp * pp}")
    model, args, cfg = build_model(hf, tp, pp, sp, overrides)
    load_hf_weights(model, str(hf), args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    twin = TwinParams(ddp)  # the original weights: pi_old, the twin, GRPO's reference
    perturb(model)  # the online policy has moved on

    prompts, responses = _rows()
    tokens, mask = pack_rows(prompts, responses, length_multiple=2)
    positive = (REWARDS > 0).reshape(-1)
    algorithm = Algorithm(cfg.algorithm)
    if algorithm == Algorithm.popo:
        weights = popo_weights(REWARDS, cfg.popo.redistribution).reshape(-1)
    else:
        weights = grpo_advantages(REWARDS, cfg.grpo.advantage_std).reshape(-1)
    full = PolicyBatch(tokens, mask, weights, positive)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = full.size // dp
    batch = full[dp_rank * rows : (dp_rank + 1) * rows]  # each data-parallel rank holds one group
    settings = LossSettings.from_config(cfg, args.vocab_size, temperature=TEMPERATURE)

    with twin.swapped_in():
        before = forward_only(ddp, batch.micro_batches(microbatches), settings, hidden=True)
    last_stage = parallel_state.is_pipeline_last_stage()
    if last_stage:
        old = torch.cat([o.logprobs for o in before])
        batch = batch.with_fields(old_logprobs=old, rollout_logprobs=_engine_logprobs(old), ref_logprobs=old)
    predictor = None
    if cfg.popo.similarity.predictor == "linear" and last_stage:
        predictor = SimilarityPredictor(args.hidden_size, sequence_parallel=sp)
    metrics = forward_backward(
        ddp,
        batch.micro_batches(microbatches),
        settings,
        loss_normalizers(batch, settings, all_response_tokens=float(full.response_lengths().sum())),
        twin_hidden=[o.hidden for o in before] if settings.uses_twin_hidden else None,
        predictor=predictor,
    )

    reference = _hf_reference(hf, case, cfg, tokens, mask, weights, positive, weights)
    if last_stage:
        reported = metrics.reduce(parallel_state.get_data_parallel_group())
        assert math.isclose(reported["loss/total"], reference["loss"], rel_tol=LOSS_TOL, abs_tol=LOSS_TOL), (
            f"{where} {case}: loss {reported['loss/total']} vs reference {reference['loss']}"
        )
        assert math.isclose(reported["rollout/logprob_abs_diff_max"], reference["mismatch_max"], abs_tol=1e-5)
    checked = 0
    for pname, param, expected in iter_megatron_shards(model, reference["grads"], args, cfg):
        diff = (param.main_grad - expected.to(param.main_grad.device)).abs().max().item()
        assert diff < GRAD_TOL, f"{where} {case}: gradient of {pname} differs from the reference by {diff}"
        checked += 1
    assert checked == len(list(model.parameters()))
    assert any(p.main_grad.abs().max() > 0 for p in model.parameters()), f"{where} {case}: no gradient at all"
    if predictor is not None:
        predictor.finish_grad_sync()
        for pname, param in predictor.linear.named_parameters():
            diff = (param.grad - reference["grads"][f"predictor.{pname}"].to(param.grad.device)).abs().max().item()
            assert diff < GRAD_TOL, f"{where} {case}: predictor {pname} gradient differs by {diff}"
    dist.barrier()


def _grpo_advantages_closed_form(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (population std + 1e-6) per group, written out."""
    out = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        out += [(r - mean) / (std + 1e-6) for r in row]
    return torch.tensor(out)


def _all_tokens_case(hf: Path, tp: int, where: str) -> None:
    """POPO with all_tokens + grpo_matched on the positives alone has GRPO's gradient on the positives: the
    gradient of GRPO's token-mean loss over every rollout with the negatives' terms left out."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.algo.advantages import popo_weights
    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.step import LossSettings, forward_backward, forward_only, loss_normalizers
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    parallel_state.destroy_model_parallel()
    overrides = (
        "popo.loss_normalizer=all_tokens",
        "popo.redistribution=grpo_matched",
        "popo.twin.enabled=false",  # the policy loss alone
        f"optim.use_distributed_optimizer={dist.get_world_size() == tp}",
    )
    model, args, cfg = build_model(hf, tp, 1, False, overrides)
    load_hf_weights(model, str(hf), args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    old_policy = TwinParams(ddp)
    perturb(model)
    prompts, responses = _rows()
    tokens, mask = pack_rows(prompts, responses)
    positive = (REWARDS > 0).reshape(-1)
    weights = popo_weights(REWARDS, cfg.popo.redistribution).reshape(-1)
    # The trainer's POPO batch: the positives only; the normaliser counts every rollout's tokens.
    batch = PolicyBatch(tokens[positive], mask[positive], weights[positive], positive[positive])
    settings = LossSettings.from_config(cfg, args.vocab_size, temperature=TEMPERATURE)
    with old_policy.swapped_in():
        old = forward_only(ddp, batch.micro_batches(1), settings)
    if parallel_state.is_pipeline_last_stage():
        batch = batch.with_fields(old_logprobs=old[0].logprobs)
    normalizers = loss_normalizers(batch, settings, all_response_tokens=float(mask.sum()))
    assert normalizers.policy == mask.sum().item()
    forward_backward(ddp, batch.micro_batches(1), settings, normalizers)

    grpo_cfg = config_for(hf, tp, 1, overrides=("algorithm=grpo",))
    advantages = torch.where(positive, _grpo_advantages_closed_form(REWARDS), 0.0)  # the positives' terms
    reference = _hf_reference(hf, "grpo", grpo_cfg, tokens, mask, None, positive, advantages)
    for pname, param, expected in iter_megatron_shards(model, reference["grads"], args, cfg):
        diff = (param.main_grad - expected.to(param.main_grad.device)).abs().max().item()
        assert diff < GRAD_TOL, f"{where}: gradient of {pname} differs from GRPO's on the positives by {diff}"
    assert any(p.main_grad.abs().max() > 0 for p in model.parameters())
    dist.barrier()


def _all_tokens_worker(hf: str, tp: int) -> None:
    _all_tokens_case(Path(hf), tp, f"tp{tp}")


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_all_tokens_grpo_matched_gives_grpos_gradient_on_the_positives(tiny_models, tp):
    run_local(_all_tokens_worker, tp, str(tiny_models["qwen2_tied"]), tp)


# Three mini-batches of two groups: a flat group (all rewards equal, zero advantages) next to a learning one,
# twice, and a mini-batch of flat groups only.
FLAT_REWARDS = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], [1, 1, 1, 1]]
)


def _grpo_left_out_worker(hf: str) -> None:
    """GRPO without KL leaves its zero-advantage rows out of the batch (trainer.batching.rank_rows), and each
    mini-batch's gradient is still that of GRPO's token-mean over every rollout dealt to it, flat ones counted:
    checked against the transformers reference on the mini-batch's full rows, at DP=1 or DP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import LossSettings, forward_backward, forward_only, loss_normalizers
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.trainer.batching import rank_rows
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    minis = 3
    overrides = (
        "algorithm=grpo",
        "grpo.kl_beta=0.0",
        f"train.mini_batches={minis}",
        "train.micro_batch_size=2",
        "optim.use_distributed_optimizer=false",
    )
    model, args, cfg = build_model(Path(hf), 1, 1, False, overrides)
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    old_policy = TwinParams(ddp)
    perturb(model)
    gen = torch.Generator().manual_seed(11)
    prompts = [
        torch.randint(1, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(2, 6, (24,), generator=gen)
    ]
    responses = [
        torch.randint(1, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(1, 7, (24,), generator=gen)
    ]
    full = make_policy_batch(cfg, prompts, responses, FLAT_REWARDS)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = rank_rows(full, cfg, dp, dp_rank)
    # Per rank, the busiest mini-batch holds the 4 learning rows of its 8 dealt (DP=1) or 2 of 4 (DP=2).
    assert rows.batch.size == minis * 4 // dp, f"{rows.batch.size} rows: the flat ones were not left out"
    settings = LossSettings.from_config(cfg, args.vocab_size, temperature=TEMPERATURE)
    batch = rows.batch
    with old_policy.swapped_in():
        old = forward_only(ddp, batch.micro_batches(batch.size // 2), settings)
    batch = batch.with_fields(old_logprobs=torch.cat([o.logprobs for o in old]))

    grpo_cfg = config_for(Path(hf), 1, 1, overrides=("algorithm=grpo", "grpo.kl_beta=0.0"))
    advantages = _grpo_advantages_closed_form(FLAT_REWARDS)
    for k, (mini, tokens) in enumerate(zip(batch.micro_batches(minis), rows.tokens, strict=True)):
        dealt = torch.arange(8 * k, 8 * (k + 1))  # every rank's share of mini-batch k: two whole groups
        assert tokens == float(full.loss_mask[dealt].sum()), f"mini-batch {k}: normaliser {tokens}"
        ddp.zero_grad_buffer()
        normalizers = loss_normalizers(mini, settings, tokens)
        forward_backward(ddp, mini.micro_batches(mini.size // 2), settings, normalizers)
        reference = _hf_reference(
            Path(hf), "grpo", grpo_cfg, full.tokens[dealt], full.loss_mask[dealt], None, None, advantages[dealt]
        )
        for pname, param, expected in iter_megatron_shards(model, reference["grads"], args, cfg):
            diff = (param.main_grad - expected.to(param.main_grad.device)).abs().max().item()
            assert diff < GRAD_TOL, f"dp{dp} mini-batch {k}: gradient of {pname} differs by {diff}"
        learning = any(p.main_grad.abs().max() > 0 for p in model.parameters())
        assert learning == (k < 2), f"mini-batch {k}: a gradient where there is {'no' if k < 2 else 'a'} signal"
    dist.barrier()


@pytest.mark.parametrize("dp", [1, 2], ids=["dp1", "dp2"])
def test_grpo_leaves_out_zero_advantage_rows_with_the_same_gradient(tiny_models, dp):
    run_local(_grpo_left_out_worker, dp, str(tiny_models["qwen2_tied"]))


def _joint_clip_worker(hf: str) -> None:
    """The linear predictor is inside gradient clipping: the policy's and the predictor's gradients are
    scaled by one coefficient, clip / joint norm, with the joint norm computed here from the raw gradients."""
    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.predictor import SimilarityPredictor, clip_with_predictor
    from popo_megatron.algo.step import LossSettings, forward_backward, forward_only, loss_normalizers
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.model.training import build_optimizer, wrap_ddp
    from popo_megatron.weights import load_hf_weights

    overrides = (
        "popo.similarity.beta=0.5",
        "popo.similarity.predictor=linear",
        "optim.use_distributed_optimizer=false",
    )
    model, args, cfg = build_model(Path(hf), 1, 1, False, overrides)
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    optimizer = build_optimizer(ddp, cfg)
    twin = TwinParams(ddp)
    perturb(model)
    prompts, responses = _rows()
    tokens, mask = pack_rows(prompts, responses)
    batch = PolicyBatch(tokens, mask, torch.full((8,), 0.25), torch.ones(8, dtype=torch.bool))
    settings = LossSettings.from_config(cfg, args.vocab_size)
    with twin.swapped_in():
        before = forward_only(ddp, batch.micro_batches(1), settings, hidden=True)
    batch = batch.with_fields(old_logprobs=before[0].logprobs)
    predictor = SimilarityPredictor(args.hidden_size)
    forward_backward(
        ddp,
        batch.micro_batches(1),
        settings,
        loss_normalizers(batch, settings, all_response_tokens=float(mask.sum())),
        [before[0].hidden],
        predictor,
    )
    predictor.finish_grad_sync()
    model_grads = [p.main_grad.clone() for p in model.parameters()]

    def norm(grads):
        return math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))

    # The predictor's real gradient is a few % of the joint norm here: scale it to the policy's, so that the
    # joint norm and the policy's alone differ clearly.
    factor = norm(model_grads) / norm(p.grad for p in predictor.parameters())
    for param in predictor.parameters():
        param.grad.mul_(factor)
    predictor_grads = [p.grad.clone() for p in predictor.parameters()]
    joint = norm(model_grads + predictor_grads)

    clip = joint / 4
    reported = clip_with_predictor(optimizer, ddp, predictor, clip)
    assert reported == pytest.approx(joint, rel=1e-5)
    coefficient = clip / (joint + 1e-6)
    for param, grad in zip(model.parameters(), model_grads, strict=True):
        torch.testing.assert_close(param.main_grad, grad * coefficient, rtol=1e-5, atol=1e-8)
    for param, grad in zip(predictor.parameters(), predictor_grads, strict=True):
        torch.testing.assert_close(param.grad, grad * coefficient, rtol=1e-5, atol=1e-8)
    # Measured again (as the step that follows would), the joint norm is at the bound: nothing left to clip.
    assert clip_with_predictor(optimizer, ddp, predictor, clip) == pytest.approx(clip, rel=1e-4)


def test_predictor_is_clipped_with_the_policy(tiny_models):
    run_local(_joint_clip_worker, 1, str(tiny_models["qwen2_tied"]))


# (tp, pp, sp, micro-batches) per layout, grouped by world size.
LAYOUTS = {
    1: {"tp1": (1, 1, False, 1), "tp1_4mb": (1, 1, False, 4)},
    2: {
        "tp2": (2, 1, False, 1),
        "tp2_sp_2mb": (2, 1, True, 2),
        "dp2_2mb": (1, 1, False, 2),
        "pp2_2mb": (1, 2, False, 2),
    },
}


def _layouts_worker(model_dirs: dict, layouts: dict) -> None:
    for where, (tp, pp, sp, microbatches) in layouts.items():
        for name, hf in model_dirs.items():
            for case in CASES:
                _step_case(Path(hf), case, tp, pp, sp, microbatches, f"{name} at {where}")


def test_step_matches_transformers_reference_on_one_rank(tiny_models):
    models = {k: str(tiny_models[k]) for k in ("qwen2_tied", "qwen2.5_gqa1")}
    run_local(_layouts_worker, 1, models, LAYOUTS[1])


def test_step_matches_transformers_reference_across_tp_sp_dp_pp(tiny_models):
    models = {k: str(tiny_models[k]) for k in ("qwen2_tied", "qwen2.5_gqa1")}
    run_local(_layouts_worker, 2, models, LAYOUTS[2])
