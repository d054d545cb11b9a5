"""What POPO does to a real model (megatron-core over gloo), and the edge cases of a step.

- The implicit negative gradient: one step of the paper's POPO, where only the
  positives carry weight (the negatives are forwarded for the entropy bonus
  alone), raises the log-probability of the positive responses and lowers that
  of the sampled negatives.
- A step without positives, with only all-correct groups, with only empty
  responses, or with a positive cut at the length limit runs cleanly: finite
  loss, the gradient the rule implies (zero or not), metrics that say so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_helpers import build_model, perturb

from popo_megatron.launch import run_local

# One-token answers (a multiple-choice task): every rollout of a group shares the context at which the
# policy's softmax moves probability between the answers.
GROUPS, G, PROMPT_LEN = 8, 8, 6
LEARNING_RATE = 2e-3
SHARPEN = 8.0


def _peaked_model(hf: Path, out: Path) -> Path:
    """The tiny random model with its output distribution sharpened (final norm x SHARPEN) so that, as in
    a trained model, the policy favours some answers; a near-uniform random policy favours none."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    model.save_pretrained(out)
    return out


def _sample_answers(hf: Path) -> tuple[list[list[int]], list[list[int]]]:
    """G one-token answers per prompt sampled from the model itself at temperature 1 (transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    prompts, answers = [], []
    for _ in range(GROUPS):
        prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=gen)
        with torch.no_grad():
            probs = model(prompt.unsqueeze(0)).logits[0, -1].softmax(-1)
        for token in torch.multinomial(probs, G, replacement=True, generator=gen).tolist():
            prompts.append(prompt.tolist())
            answers.append([token])
    return prompts, answers


def _token_logprobs(ddp, batch, settings) -> torch.Tensor:
    from popo_megatron.algo.step import forward_only

    return torch.cat([o.logprobs for o in forward_only(ddp, batch.micro_batches(1), settings)])


def _objective(ddp, args, cfg, group_size: int = G):
    from popo_megatron.objectives import ObjectiveContext, build_objective

    context = ObjectiveContext(cfg.loss, cfg.optim, args.vocab_size, args.hidden_size, 1.0, 0, 1, group_size, 1, False)
    return build_objective(cfg, context, ddp)


def _popo_step(ddp, objective, full, cfg, settings, dp=1, dp_rank=0):
    """The trainer's update of one mini-batch: deal, prepare, context, forward-backward. Returns the
    context and the metrics (None and {} when the mini-batch has nothing to learn from)."""
    from popo_megatron.algo.step import Forwards, forward_backward
    from popo_megatron.metrics import MetricAccumulator
    from popo_megatron.trainer.batching import rank_rows

    forwards = Forwards(ddp, settings, cfg.train.micro_batch_size)
    rows = rank_rows(full, objective.dealt(full), objective.carries_gradient(full), cfg, dp, dp_rank)
    metrics = MetricAccumulator()
    batch, weights = objective.prepare(full, rows.batch, forwards, metrics)
    context = objective.mini_context(batch, rows.tokens[0], rows.responses[0], forwards, 1)
    ddp.zero_grad_buffer()
    if context.learns:
        forward_backward(
            ddp,
            context.micro_batches,
            lambda i, mb, lg, h: objective.loss(i, mb, lg, h, context, metrics),
            context.captures_hidden,
        )
        if objective.head is not None:
            objective.head.finish_grad_sync()
    return context, metrics.reduce(count_keys=True), weights


def _implicit_negative_worker(hf: str, prompts, answers, out: str) -> None:
    import torch.distributed as dist

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import LogprobSettings
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import load_hf_weights

    # The paper's POPO at its defaults (the entropy bonus forwards the negatives; their weight is 0).
    model, args, cfg = build_model(Path(hf), 2, 1, overrides=("train.micro_batch_size=64",))
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    objective = _objective(ddp, args, cfg)
    settings = LogprobSettings(args.vocab_size, 1.0, 1024)

    # An arbitrary but consistent verifier: an answer is correct when its token id is even.
    rewards = torch.tensor([float(a[0] % 2 == 0) for a in answers]).view(GROUPS, G)
    full = make_policy_batch(prompts, answers, objective.row_values(rewards), objective.positive(rewards))
    before = _token_logprobs(ddp, full, settings)[full.loss_mask]
    context, reported, weights = _popo_step(ddp, objective, full, cfg, settings)
    assert context.learns and torch.all(weights[~full.positive] == 0), "only the positives carry weight"
    assert reported["loss/entropy"] < 0, "the negatives were forwarded for the entropy bonus"
    # One plain gradient step (Adam's per-parameter normalisation would blur what the gradient itself does).
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(LEARNING_RATE * param.main_grad)
    after = _token_logprobs(ddp, full, settings)[full.loss_mask]
    if dist.get_rank() == 0:
        torch.save({"before": before, "after": after, "positive": full.positive}, out)


def test_positive_only_step_lowers_sampled_negatives(tiny_models, tmp_path):
    hf = _peaked_model(tiny_models["qwen2_tied"], tmp_path / "peaked")
    prompts, answers = _sample_answers(hf)
    out = tmp_path / "logprobs.pt"
    run_local(_implicit_negative_worker, 2, str(hf), prompts, answers, str(out))
    result = torch.load(out, weights_only=True)
    change = result["after"] - result["before"]
    positive = result["positive"]
    assert change[positive].mean() > 0, f"the positive answers became more likely: {change[positive]}"
    negatives = change[~positive]
    assert negatives.mean() < 0, f"the sampled negatives, weighted 0, became less likely: {negatives}"
    mass_before = result["before"][~positive].exp().sum()
    mass_after = result["after"][~positive].exp().sum()
    assert mass_after < mass_before, f"total probability of the negative answers: {mass_before} -> {mass_after}"


def _edge_worker(hf: str) -> None:
    """Degenerate batches through the real step on one rank."""
    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import LogprobSettings
    from popo_megatron.config import load_config
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import load_hf_weights

    model, args, _ = build_model(Path(hf), 1, 1)
    load_hf_weights(model, hf, args, _)
    ddp = wrap_ddp(model, args, _)
    settings = LogprobSettings(args.vocab_size, 1.0, 1024)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10], [11, 12]]

    def step(rewards, responses, *overrides, drop=None):
        cfg = load_config(overrides=[f"model.hf_path={hf}", "train.micro_batch_size=2", *overrides])
        objective = _objective(ddp, args, cfg, group_size=2)  # its EMA target: the current weights
        perturb(model)  # the online policy moves on, so the similarity term has a gradient
        full = make_policy_batch(prompts, responses, objective.row_values(rewards), objective.positive(rewards))
        if drop is not None:
            full = full.without_rows(drop)
        context, reported, weights = _popo_step(ddp, objective, full, cfg, settings)
        grad = torch.sqrt(sum(p.main_grad.double().pow(2).sum() for p in model.parameters())).item()
        return context, reported, weights, grad

    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]
    context, reported, weights, grad = step(torch.zeros(2, 2), responses)
    assert not context.learns and torch.all(weights == 0), "no positives: nothing to learn, no optimiser step"

    all_correct = torch.ones(2, 2)
    context, reported, weights, grad = step(all_correct, responses)  # the paper: each group's weights sum to 1
    assert context.learns and weights.view(2, 2).sum(-1).tolist() == pytest.approx([1.0, 1.0]) and grad > 0
    assert math.isfinite(reported["loss/total"]) and reported["popo/weight_max"] < 1.0
    context, reported, weights, grad = step(
        all_correct, responses, "popo.weights=success_scaled", "popo.similarity=per_token", "popo.beta_ent=0"
    )  # success_scaled: all-correct groups weigh 0 ...
    assert torch.all(weights == 0) and reported["loss/policy"] == 0.0
    assert grad > 0 and reported["popo/drift"] > 0, "... but their representations are still anchored"

    empty = [[], [], [24, 25], []]
    context, _, _, grad = step(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), empty, "popo.beta_ent=0")
    assert not context.learns, "positives without tokens: nothing to learn"

    # A positive cut at the length limit (it fills its row): in the loss by default, out with mask_truncated.
    long = [[20, 21], [23, 30, 31, 32, 33, 34], [24, 25], [26]]
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    context, reported, _, grad = step(rewards, long, "popo.beta_ent=0")
    assert context.learns and reported["popo/weight/count"] == 1 and reported["loss/nll"] > 0 and grad > 0
    context, _, _, _ = step(rewards, long, "popo.beta_ent=0", drop=torch.tensor([False, True, False, False]))
    assert not context.learns


def test_degenerate_batches_run_cleanly(tiny_models):
    run_local(_edge_worker, 1, str(tiny_models["qwen2_tied"]))
