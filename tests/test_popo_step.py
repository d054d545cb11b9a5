"""The objectives' training step on real megatron-core, against an independent reference.

The reference is written here from the equations (docs/algorithm.md, the POPO authors' formulation):
transformers' forward of the same weights and plain torch, autograd for the gradients. The project's side
is the objective (objectives/popo.py, objectives/grpo.py) as the trainer runs it: `prepare` (pi_old, the
softmax weights, a reference), `mini_context` (global normalisers, the EMA target's features), the loss
of every micro-batch through Megatron's schedule. Every layout (TP=1 with 1 and 4 micro-batches, TP=2,
TP=2 with sequence parallelism, DP=2 sharing the global batch, PP=2) must give the reference's loss, each
of the paper's terms, and every gradient shard of every rank, the predictor's included. So the terms and
gradients are equal across TP (SP on and off), micro-batch counts, DP and PP by transitivity.

Three policies: W0 (the checkpoint: the EMA target, GRPO's reference), W1 = perturb(W0) (the policy that
generated the rollouts: pi_old, the weights' log-probs) and, for the cases with a stale ratio, the update
runs at W2 = perturb(W1) (as a second mini-batch would); otherwise at W1 (on-policy, the paper's).
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
G = 4
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])  # two groups of G = 4
# name -> (overrides, stale ratio)
CASES = {
    # The paper's POPO at the authors' defaults (noise off, a small predictor): softmax weights from pi_old,
    # the weighted NLL over N+, the pooled similarity through the MLP predictor against the EMA target,
    # the entropy bonus over every rollout, KL to the target logged.
    "popo_paper": (
        ["popo.predictor.noise_std=0", "popo.predictor.hidden=24", "popo.alpha=0.5", "popo.beta_ent=0.05"],
        False,
    ),
    # The same with the noise on: drawn per rollout from the seed, so every layout sees the same noise.
    "popo_noise": (["popo.predictor.noise_std=0.3", "popo.predictor.hidden=24", "popo.alpha=0.5"], False),
    # The paper's options and our normaliser: uniform weights divided by length, a 3-layer predictor,
    # positives only (no entropy bonus), every rollout's tokens as the normaliser.
    "popo_options": (
        [
            "popo.weights=uniform",
            "popo.length_normalize=true",
            "popo.predictor.noise_std=0",
            "popo.predictor.hidden=16",
            "popo.predictor.layers=3",
            "popo.beta_ent=0",
            "popo.normalizer=all_tokens",
        ],
        False,
    ),
    # This project's extensions, stale: the clipped ratio with TIS against engine log-probs,
    # success_scaled weights, the per-token similarity through a linear predictor, sum w|o| as normaliser.
    "popo_ours": (
        [
            "popo.weights=success_scaled",
            "popo.is_bound.mode=clip",
            "popo.similarity=per_token",
            "popo.per_token.predictor=linear",
            "popo.alpha=0.5",
            "popo.normalizer=weighted_tokens",
            "popo.beta_ent=0.02",
            "loss.rollout_correction=tis",
            "loss.tis_cap=1.5",
        ],
        True,
    ),
    "popo_truncate": (
        [
            "popo.is_bound.mode=truncate",
            "popo.weight_temperature=0.5",
            "popo.similarity=per_token",
            "popo.alpha=0.1",
            "popo.beta_ent=0",
            "popo.normalizer=all_tokens",
        ],
        True,
    ),
    "grpo": (["algorithm=grpo", "grpo.kl_beta=0.05"], True),
    # The POPO authors' GRPO baseline (TRL, loss_type grpo).
    "grpo_trl": (
        [
            "algorithm=grpo",
            "grpo.kl_beta=0.01",
            "grpo.eps_high=0.2",
            "grpo.advantage_std=sample",
            "grpo.aggregation=sequence_mean",
        ],
        True,
    ),
}
# The cases run on both model variants; the rest on the first one only (the suite's time).
BOTH_MODELS = ("popo_paper", "grpo")


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


def _reference_weights(cfg, lengths: torch.Tensor, mean_logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """POPO's w_i per the spec, one group at a time: softmax over the positives of lbar / T_w (the paper),
    1 / k (uniform), (1 - k / G) / k (success_scaled); with length_normalize w_i / |o_i| renormalised."""
    popo = cfg.popo
    out = []
    for g, row in enumerate(rewards.tolist()):
        positives = [i for i, r in enumerate(row) if r > popo.reward_threshold]
        k = len(positives)
        w = [0.0] * G
        for i in positives:
            j = g * G + i
            if popo.weights == "softmax":
                total = sum(math.exp(mean_logprobs[g * G + q].item() / popo.weight_temperature) for q in positives)
                w[i] = math.exp(mean_logprobs[j].item() / popo.weight_temperature) / total
            elif popo.weights == "uniform":
                w[i] = 1.0 / k
            else:
                w[i] = (1.0 - k / G) / k
        if popo.length_normalize and k:
            total = sum(w)
            scaled = [w[i] / max(int(lengths[g * G + i]), 1) for i in range(G)]
            w = [x * total / sum(scaled) for x in scaled]
        out += w
    return torch.tensor(out)


def _grpo_advantages_closed_form(rewards: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """(r - mean) / (std + 1e-6) per group, written out (population std, or the sample std)."""
    out = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - sample))
        out += [(r - mean) / (std + 1e-6) for r in row]
    return torch.tensor(out)


def _reference_predictor(hidden: int, cfg, seed: int) -> torch.nn.Sequential:
    """The paper's h_phi as a plain torch stack, with the initial weights the run draws from its seed."""
    from popo_megatron.algo.predictor import MLPPredictor

    built = MLPPredictor(hidden, cfg.popo.predictor.hidden, cfg.popo.predictor.layers, seed)
    parts = []
    sizes = [hidden] + [cfg.popo.predictor.hidden] * (cfg.popo.predictor.layers - 1) + [hidden]
    for i in range(cfg.popo.predictor.layers):
        parts.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < cfg.popo.predictor.layers - 1:
            parts += [torch.nn.LayerNorm(sizes[i + 1]), torch.nn.ReLU()]
    reference = torch.nn.Sequential(*parts)
    reference.load_state_dict({k.removeprefix("net."): v.cpu() for k, v in built.state_dict().items()})
    return reference


def _hf_reference(hf: Path, cfg, stale: bool, tokens, mask, rewards: torch.Tensor = REWARDS) -> dict:
    """The global loss, its terms and its gradients, with transformers and plain torch."""
    from transformers import AutoModelForCausalLM

    def load(times: int):
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        for _ in range(times):
            perturb(model)
        return model

    w0, w1, online = load(0), load(1), load(2 if stale else 1)
    vocab = w0.config.vocab_size
    targets = F.pad(tokens[:, 1:], (0, 1))
    positions = F.pad(mask[:, :-1], (1, 0))  # the positions holding response tokens

    def log_softmax(logits):
        return (logits[..., :vocab] / TEMPERATURE).log_softmax(-1)

    def target_logprobs(logits):
        return log_softmax(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def pooled(hidden):
        return (hidden * positions.unsqueeze(-1)).sum(1) / positions.sum(-1, keepdim=True).clamp(min=1)

    with torch.no_grad():
        old = target_logprobs(w1(tokens).logits)
        w0_out = w0(tokens, output_hidden_states=True)
    out = online(tokens, output_hidden_states=True)
    lp = target_logprobs(out.logits)
    log_p = log_softmax(out.logits)
    entropy = -(log_p.exp() * log_p).sum(-1)
    lengths = mask.sum(-1)
    ratio = torch.exp(lp - old)
    token_weights = torch.ones_like(lp)
    if cfg.loss.rollout_correction == "tis":
        token_weights = torch.clamp(torch.exp(old - _engine_logprobs(old)), max=cfg.loss.tis_cap)
    result = {"grads": {}, "head": None}
    if cfg.algorithm == "popo":
        popo = cfg.popo
        mean_old = torch.where(mask, old, 0.0).sum(-1) / lengths.clamp(min=1)
        weights = _reference_weights(cfg, lengths, mean_old, rewards)
        active = mask & (weights > 0)[:, None]
        n_plus = lengths[weights > 0].sum()
        nll = -(weights[:, None] * torch.where(active, lp, 0.0)).sum() / n_plus
        if popo.is_bound.mode == "none":
            surrogate = lp
        elif popo.is_bound.mode == "clip":
            surrogate = torch.clamp(ratio, max=1 + popo.is_bound.eps_high) * token_weights
        else:
            surrogate = torch.clamp(ratio, max=popo.is_bound.truncate_c).detach() * lp * token_weights
        policy_sum = -(weights[:, None] * torch.where(active, surrogate, 0.0)).sum()
        norm = {"positive_tokens": n_plus, "weighted_tokens": (weights * lengths).sum(), "all_tokens": lengths.sum()}
        policy = policy_sum / norm[popo.normalizer]
        trained = torch.ones(len(weights), dtype=torch.bool) if popo.beta_ent > 0 else rewards.reshape(-1) > 0
        ent_mask = mask & trained[:, None]
        ent = -torch.where(ent_mask, entropy, 0.0).sum() / ent_mask.sum()
        if popo.similarity == "pooled":
            head = _reference_predictor(out.hidden_states[-1].shape[-1], cfg, cfg.seed)
            z, target = pooled(out.hidden_states[-1]), pooled(w0_out.hidden_states[-1])
            if popo.predictor.noise_std > 0:  # the same draw the run makes: seed, optimiser step 0, the row
                from popo_megatron.objectives.popo import target_noise

                noise = target_noise(
                    torch.arange(len(weights)), target.shape[-1], popo.predictor.noise_std, cfg.seed, 0
                )
                target = target + torch.where((weights > 0)[:, None], noise, 0.0)
            cos = F.cosine_similarity(head(z), target, dim=-1)
            sim = -(torch.where(weights > 0, weights * cos, 0.0)).sum() / weights.sum()
        else:
            head = None
            h = out.hidden_states[-1]
            if popo.per_token.predictor == "linear":
                head = torch.nn.Linear(h.shape[-1], h.shape[-1])
                with torch.no_grad():
                    head.weight.copy_(torch.eye(h.shape[-1]))
                    head.bias.zero_()
                h = head(h)
            sim_mask = mask & (rewards.reshape(-1) > 0)[:, None]
            distance = 1 - F.cosine_similarity(h, w0_out.hidden_states[-1], dim=-1)
            sim = torch.where(sim_mask, distance, 0.0).sum() / sim_mask.sum()
        loss = policy + popo.alpha * sim + popo.beta_ent * ent
        kl_x = torch.where(ent_mask, target_logprobs(w0_out.logits) - lp.detach(), 0.0)
        result.update(
            nll=nll.item(),
            similarity=sim.item(),
            entropy_term=ent.item(),
            kl=((torch.exp(kl_x) - kl_x - 1) * ent_mask).sum().item() / ent_mask.sum().item(),
            weights=weights,
        )
        result["head"] = head
    else:
        grpo = cfg.grpo
        adv = _grpo_advantages_closed_form(rewards, sample=grpo.advantage_std == "sample")[:, None]
        per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - grpo.eps_low, 1 + grpo.eps_high))
        x = target_logprobs(w0_out.logits) - lp  # the reference policy is the checkpoint, W0
        per_token = torch.where(mask, per_token + grpo.kl_beta * (torch.exp(x) - x - 1), 0.0)
        if grpo.aggregation == "token_mean":
            loss = per_token.sum() / mask.sum()
        else:
            loss = (per_token.sum(-1) / lengths.clamp(min=1)).mean()
    loss.backward()
    result["loss"] = loss.item()
    result["grads"] = {n: p.grad for n, p in online.named_parameters()}
    if result["head"] is not None:
        result["grads"].update({f"head.{n}": p.grad for n, p in result["head"].named_parameters()})
    return result


def _objective_context(cfg, args, sp: bool):
    from popo_megatron.objectives import ObjectiveContext

    return ObjectiveContext(
        loss=cfg.loss,
        optim=cfg.optim,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        temperature=TEMPERATURE,
        seed=cfg.seed,
        total_updates=1,
        group_size=G,
        mini_batches=1,
        sequence_parallel=sp,
    )


def _step_case(
    hf: Path,
    case: str,
    tp: int,
    pp: int,
    sp: bool,
    microbatches: int,
    where: str,
    budget: int | None = None,
    cp: int = 1,
) -> None:
    """One step of the case's objective at this layout (packed into micro-batches of `budget` tokens when
    given, each sequence split over `cp` context-parallel ranks), checked against the reference."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.objectives import build_objective
    from popo_megatron.trainer.batching import rank_rows
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    overrides, stale = CASES[case]
    parallel_state.destroy_model_parallel()
    dp = dist.get_world_size() // (tp * pp * cp)
    rows_per_rank = 8 // dp
    # With the distributed optimiser each data- (and context-) parallel rank holds the reduced gradient of its
    # own slice only; plain DDP all-reduces, so every gradient can be compared. (The sliced twin is tested in
    # test_twin.py.)
    overrides = (
        *overrides,
        f"optim.use_distributed_optimizer={dp * cp == 1}",
        f"train.micro_batch_size={rows_per_rank // microbatches}",
        f"train.max_tokens_per_microbatch={'null' if budget is None else budget}",
        f"parallel.context_parallel_size={cp}",
    )
    model, args, cfg = build_model(hf, tp, pp, sp, overrides)
    load_hf_weights(model, str(hf), args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    objective = build_objective(cfg, _objective_context(cfg, args, sp), ddp)  # its target: W0
    perturb(model)  # W1, the policy that generated the rollouts

    prompts, responses = _rows()
    full = make_policy_batch(
        prompts, responses, objective.row_values(REWARDS), objective.positive(REWARDS), length_multiple=2
    )
    settings = LogprobSettings(args.vocab_size, TEMPERATURE, cfg.loss.logprob_chunk_tokens)
    forwards = Forwards(ddp, settings, cfg.train.micro_batch_size, cfg.train.max_tokens_per_microbatch)
    last_stage = parallel_state.is_pipeline_last_stage()
    dp_rank = parallel_state.get_data_parallel_rank()
    generated = forwards.rows(full)
    if last_stage:  # the engine's log-probs of the sampled tokens (with a mismatch), for TIS
        full = full.with_fields(rollout_logprobs=_engine_logprobs(generated.logprobs))
    # The trainer's deal: the objective's rows, in turn to the data-parallel ranks, padded to equal shapes.
    dealt = rank_rows(full, objective.dealt(full), objective.carries_gradient(full), cfg, dp, dp_rank)
    metrics = MetricAccumulator()
    batch, values = objective.prepare(full, dealt.batch, forwards, metrics)
    if stale:
        perturb(model)  # W2: the update's policy has moved since the rollouts
    context = objective.mini_context(batch, dealt.tokens[0], dealt.responses[0], forwards, 0)
    assert context.learns
    if budget is not None:
        packs = [mb.layout for mb in context.micro_batches]
        assert all(p is not None and int(p.length.sum()) <= budget for p in packs), f"{where} {case}: not packed"
        assert any(len(p.length) > 1 for p in packs), f"{where} {case}: no pack holds two sequences"
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(packs))
        assert len(set(counts)) == 1, f"{where} {case}: micro-batches per rank {counts}"

    def loss_of(index, mb, logits, hidden):
        return objective.loss(index, mb, logits, hidden, context, metrics)

    ddp.zero_grad_buffer()
    forward_backward(ddp, context.micro_batches, loss_of, context.captures_hidden)
    head = objective.head
    if objective.uses_head and head is not None:
        head.finish_grad_sync()

    reference = _hf_reference(hf, cfg, stale, full.tokens, full.loss_mask)
    if cfg.algorithm == "popo":
        assert torch.allclose(values, reference["weights"], atol=1e-6), f"{where} {case}: weights {values}"
    if last_stage:
        reported = metrics.reduce(parallel_state.get_data_parallel_group())

        def close(key, expected):
            assert math.isclose(reported[key], expected, rel_tol=LOSS_TOL, abs_tol=LOSS_TOL), (
                f"{where} {case}: {key} {reported[key]} vs reference {expected}"
            )

        close("loss/total", reference["loss"])
        if cfg.algorithm == "popo":
            close("loss/nll", reference["nll"])
            close("loss/similarity", reference["similarity"])
            close("loss/entropy", reference["entropy_term"])
            close("popo/kl_to_target", reference["kl"])
    checked = 0
    for pname, param, expected in iter_megatron_shards(model, reference["grads"], args, cfg):
        diff = (param.main_grad - expected.to(param.main_grad.device)).abs().max().item()
        assert diff < GRAD_TOL, f"{where} {case}: gradient of {pname} differs from the reference by {diff}"
        checked += 1
    assert checked == len(list(model.parameters()))
    assert any(p.main_grad.abs().max() > 0 for p in model.parameters()), f"{where} {case}: no gradient at all"
    if head is not None:  # the same modules in the same order: compare parameter by parameter
        for (pname, param), (rname, expected) in zip(
            head.named_parameters(),
            [(k, v) for k, v in reference["grads"].items() if k.startswith("head.")],
            strict=True,
        ):
            diff = (param.grad - expected.to(param.grad.device)).abs().max().item()
            assert diff < GRAD_TOL, f"{where} {case}: head {pname} ({rname}) gradient differs by {diff}"
    dist.barrier()


def _all_tokens_case(hf: Path, tp: int, where: str) -> None:
    """POPO with all_tokens + grpo_matched on the positives alone has GRPO's gradient on the positives: the
    gradient of GRPO's token-mean loss over every rollout with the negatives' terms left out."""
    import torch.distributed as dist

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.objectives import build_objective
    from popo_megatron.weights import iter_megatron_shards, load_hf_weights

    parallel_state_reset()
    overrides = (
        "popo.normalizer=all_tokens",
        "popo.weights=grpo_matched",
        "popo.alpha=0",  # the policy term alone
        "popo.beta_ent=0",
        "popo.is_bound.mode=clip",  # the ratio against W1's log-probs: GRPO's surrogate on positives
        "loss.old_logprobs=rollout",
        f"optim.use_distributed_optimizer={dist.get_world_size() == tp}",
    )
    model, args, cfg = build_model(hf, tp, 1, False, overrides)
    load_hf_weights(model, str(hf), args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    objective = build_objective(cfg, _objective_context(cfg, args, False), ddp)
    prompts, responses = _rows()
    full = make_policy_batch(prompts, responses, objective.row_values(REWARDS), objective.positive(REWARDS))
    settings = LogprobSettings(args.vocab_size, TEMPERATURE, cfg.loss.logprob_chunk_tokens)
    forwards = Forwards(ddp, settings, 8)
    perturb(model)  # W1: pi_old, given as the engine's log-probs
    old = forwards.rows(full, logprobs=True).logprobs
    full = full.with_fields(rollout_logprobs=old.cpu())
    perturb(model)  # W2: the update's policy
    positives = full[full.positive]  # the trainer's POPO batch: the positives only
    batch, _ = objective.prepare(full, positives, forwards, MetricAccumulator())
    context = objective.mini_context(batch, float(full.response_lengths().sum()), float(full.size), forwards, 0)
    assert context.policy_norm == full.loss_mask.sum().item()
    metrics = MetricAccumulator()
    forward_backward(
        ddp, context.micro_batches, lambda i, mb, lg, h: objective.loss(i, mb, lg, h, context, metrics), False
    )

    grpo_cfg = config_for(hf, tp, 1, overrides=("algorithm=grpo", "grpo.kl_beta=0"))
    reference = _hf_reference(hf, grpo_cfg, True, full.tokens, full.loss_mask & full.positive[:, None])
    for pname, param, expected in iter_megatron_shards(model, reference["grads"], args, cfg):
        # The reference normalises by the positives' tokens (its mask): rescale to every rollout's.
        expected = expected * (full.loss_mask & full.positive[:, None]).sum() / full.loss_mask.sum()
        diff = (param.main_grad - expected.to(param.main_grad.device)).abs().max().item()
        assert diff < GRAD_TOL, f"{where}: gradient of {pname} differs from GRPO's on the positives by {diff}"
    assert any(p.main_grad.abs().max() > 0 for p in model.parameters())
    dist.barrier()


def parallel_state_reset() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


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
    checked against the reference on the mini-batch's full rows, at DP=1 or DP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.objectives import build_objective
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
    context = _objective_context(cfg, args, False)
    objective = build_objective(cfg, context.__class__(**{**context.__dict__, "mini_batches": minis}), ddp)
    perturb(model)  # W1: pi_old
    gen = torch.Generator().manual_seed(11)
    prompts = [
        torch.randint(1, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(2, 6, (24,), generator=gen)
    ]
    responses = [
        torch.randint(1, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(1, 7, (24,), generator=gen)
    ]
    full = make_policy_batch(prompts, responses, objective.row_values(FLAT_REWARDS), objective.positive(FLAT_REWARDS))
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = rank_rows(full, objective.dealt(full), objective.carries_gradient(full), cfg, dp, dp_rank)
    # Per rank, the busiest mini-batch holds the 4 learning rows of its 8 dealt (DP=1) or 2 of 4 (DP=2).
    assert rows.batch.size == minis * 4 // dp, f"{rows.batch.size} rows: the flat ones were not left out"
    forwards = Forwards(ddp, LogprobSettings(args.vocab_size, TEMPERATURE, 1024), cfg.train.micro_batch_size)
    batch, _ = objective.prepare(full, rows.batch, forwards, MetricAccumulator())
    perturb(model)  # W2: the update's policy

    grpo_cfg = config_for(Path(hf), 1, 1, overrides=("algorithm=grpo", "grpo.kl_beta=0.0"))
    minis_of = zip(batch.micro_batches(minis), rows.tokens, rows.responses, strict=True)
    for k, (mini, tokens, responses_k) in enumerate(minis_of):
        dealt = torch.arange(8 * k, 8 * (k + 1))  # every rank's share of mini-batch k: two whole groups
        assert tokens == float(full.loss_mask[dealt].sum()), f"mini-batch {k}: normaliser {tokens}"
        assert responses_k == 8.0
        ddp.zero_grad_buffer()
        mini_context = objective.mini_context(mini, tokens, responses_k, forwards, k)
        metrics = MetricAccumulator()
        forward_backward(
            ddp,
            mini_context.micro_batches,
            lambda i, mb, lg, h, c=mini_context, mt=metrics: objective.loss(i, mb, lg, h, c, mt),
            False,
        )
        reference = _hf_reference(
            Path(hf), grpo_cfg, True, full.tokens[dealt], full.loss_mask[dealt], FLAT_REWARDS[2 * k : 2 * k + 2]
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
    """The predictor is inside gradient clipping: the policy's and the predictor's gradients are scaled by one
    coefficient, clip / joint norm, with the joint norm computed here from the raw gradients."""
    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.predictor import clip_with_head
    from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.model.training import build_optimizer, wrap_ddp
    from popo_megatron.objectives import build_objective
    from popo_megatron.weights import load_hf_weights

    overrides = ("popo.alpha=0.5", "popo.predictor.hidden=16", "optim.use_distributed_optimizer=false")
    model, args, cfg = build_model(Path(hf), 1, 1, False, overrides)
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    optimizer = build_optimizer(ddp, cfg)
    objective = build_objective(cfg, _objective_context(cfg, args, False), ddp)
    perturb(model)
    prompts, responses = _rows()
    full = make_policy_batch(prompts, responses, objective.row_values(REWARDS), objective.positive(REWARDS))
    forwards = Forwards(ddp, LogprobSettings(args.vocab_size, TEMPERATURE, 1024), 8)
    batch, _ = objective.prepare(full, full, forwards, MetricAccumulator())
    context = objective.mini_context(batch, float(full.response_lengths().sum()), 8.0, forwards, 1)
    metrics = MetricAccumulator()
    forward_backward(
        ddp, context.micro_batches, lambda i, mb, lg, h: objective.loss(i, mb, lg, h, context, metrics), True
    )
    predictor = objective.head
    predictor.finish_grad_sync()
    model_grads = [p.main_grad.clone() for p in model.parameters()]

    def norm(grads):
        return math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))

    # Scale the predictor's gradient to the policy's, so that the joint norm and the policy's alone differ
    # clearly.
    factor = norm(model_grads) / norm(p.grad for p in predictor.parameters())
    for param in predictor.parameters():
        param.grad.mul_(factor)
    predictor_grads = [p.grad.clone() for p in predictor.parameters()]
    joint = norm(model_grads + predictor_grads)

    clip = joint / 4
    reported = clip_with_head(optimizer, predictor, clip)
    assert reported == pytest.approx(joint, rel=1e-5)
    coefficient = clip / (joint + 1e-6)
    for param, grad in zip(model.parameters(), model_grads, strict=True):
        torch.testing.assert_close(param.main_grad, grad * coefficient, rtol=1e-5, atol=1e-8)
    for param, grad in zip(predictor.parameters(), predictor_grads, strict=True):
        torch.testing.assert_close(param.grad, grad * coefficient, rtol=1e-5, atol=1e-8)
    # Measured again (as the step that follows would), the joint norm is at the bound: nothing left to clip.
    assert clip_with_head(optimizer, predictor, clip) == pytest.approx(clip, rel=1e-4)
    # A NaN anywhere makes the norm NaN and scales nothing: the caller refuses the update.
    next(model.parameters()).main_grad.view(-1)[0] = float("nan")
    kept = [p.grad.clone() for p in predictor.parameters()]
    assert math.isnan(clip_with_head(optimizer, predictor, clip / 10))
    assert all(torch.equal(p.grad, g) for p, g in zip(predictor.parameters(), kept, strict=True))


def test_predictor_is_clipped_with_the_policy(tiny_models):
    run_local(_joint_clip_worker, 1, str(tiny_models["qwen2_tied"]))


# (tp, pp, sp, micro-batches, token budget of a packed micro-batch or None, cp) per layout, by world size.
# Packed, a micro-batch holds whole sequences end to end (train.max_tokens_per_microbatch): 24 tokens take
# two to four of these rows (3-11 tokens each). Context parallelism (cp) splits each packed sequence.
LAYOUTS = {
    1: {
        "tp1": (1, 1, False, 1, None, 1),
        "tp1_4mb": (1, 1, False, 4, None, 1),
        "tp1_packed": (1, 1, False, 1, 24, 1),
    },
    2: {
        "tp2": (2, 1, False, 1, None, 1),
        "tp2_sp_2mb": (2, 1, True, 2, None, 1),
        "dp2_2mb": (1, 1, False, 2, None, 1),
        "pp2_2mb": (1, 2, False, 2, None, 1),
        "tp2_sp_packed": (2, 1, True, 1, 24, 1),
        "dp2_packed": (1, 1, False, 1, 24, 1),
        "pp2_packed": (1, 2, False, 1, 24, 1),
        "cp2_packed": (1, 1, False, 1, 24, 2),
    },
}
# Packed layouts run the cases whose losses read the packing differently: pooled features and the entropy
# (the paper's POPO), per-token hidden states and the ratio (ours), GRPO's per-sequence means.
PACKED_CASES = ("popo_paper", "popo_ours", "grpo_trl")


def _layouts_worker(model_dirs: dict, layouts: dict) -> None:
    first = next(iter(model_dirs))
    for where, (tp, pp, sp, microbatches, budget, cp) in layouts.items():
        for name, hf in model_dirs.items():
            for case in CASES:
                if budget is not None and (name != first or case not in PACKED_CASES):
                    continue
                if name == first or case in BOTH_MODELS:
                    _step_case(Path(hf), case, tp, pp, sp, microbatches, f"{name} at {where}", budget, cp)


def test_step_matches_the_reference_on_one_rank(tiny_models):
    models = {k: str(tiny_models[k]) for k in ("qwen2_tied", "qwen2.5_gqa1")}
    run_local(_layouts_worker, 1, models, LAYOUTS[1])


def test_step_matches_the_reference_across_tp_sp_dp_pp(tiny_models):
    models = {k: str(tiny_models[k]) for k in ("qwen2_tied", "qwen2.5_gqa1")}
    run_local(_layouts_worker, 2, models, LAYOUTS[2])
