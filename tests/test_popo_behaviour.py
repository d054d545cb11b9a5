"""What POPO does to a real model (megatron-core over gloo), and the edge cases of a step.

- The implicit negative gradient: one positive-only step raises the
  log-probability of the positive responses and lowers that of sampled
  negative responses that never entered the batch.
- A step without positives, with only all-correct groups, with only empty
  responses, or with a positive cut at the length limit runs cleanly: finite
  loss, the gradient the rule implies (zero or not), metrics that say so.
"""

from __future__ import annotations

import math
from pathlib import Path

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


def _implicit_negative_worker(hf: str, prompts, answers, out: str) -> None:
    import torch.distributed as dist

    from popo_megatron.algo.advantages import popo_weights
    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.step import LossSettings, forward_backward, loss_normalizers
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import load_hf_weights

    model, args, cfg = build_model(Path(hf), 2, 1, overrides=("popo.twin.enabled=false", "popo.redistribution=uniform"))
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    settings = LossSettings.from_config(cfg, args.vocab_size)

    # An arbitrary but consistent verifier: an answer is correct when its token id is even.
    rewards = torch.tensor([float(a[0] % 2 == 0) for a in answers]).view(GROUPS, G)
    tokens, mask = pack_rows(prompts, answers)
    positive = (rewards > 0).reshape(-1)
    everything = PolicyBatch(tokens, mask, popo_weights(rewards, "uniform").reshape(-1), positive)
    before = _token_logprobs(ddp, everything, settings)[mask]

    # The training batch holds the positives only: the negatives never enter the loss.
    train = PolicyBatch(tokens[positive], mask[positive], everything.sample_weights[positive], positive[positive])
    train = train.with_fields(old_logprobs=_token_logprobs(ddp, train, settings))
    normalizers = loss_normalizers(train, settings, all_response_tokens=float(mask.sum()))
    forward_backward(ddp, train.micro_batches(1), settings, normalizers)
    # One plain gradient step (Adam's per-parameter normalisation would blur what the gradient itself does).
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(LEARNING_RATE * param.main_grad)
    after = _token_logprobs(ddp, everything, settings)[mask]
    if dist.get_rank() == 0:
        torch.save({"before": before, "after": after, "positive": positive}, out)


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
    assert negatives.mean() < 0, f"the sampled negatives, never in the loss, became less likely: {negatives}"
    mass_before = result["before"][~positive].exp().sum()
    mass_after = result["after"][~positive].exp().sum()
    assert mass_after < mass_before, f"total probability of the negative answers: {mass_before} -> {mass_after}"


def _edge_worker(hf: str) -> None:
    """Degenerate batches through the real step on one rank."""
    from popo_megatron.algo.advantages import group_stats, popo_weights
    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.algo.step import LossSettings, forward_backward, forward_only, loss_normalizers
    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.weights import load_hf_weights

    model, args, cfg = build_model(Path(hf), 1, 1, overrides=("popo.similarity.beta=0.5",))
    load_hf_weights(model, hf, args, cfg)
    ddp = wrap_ddp(model, args, cfg)
    twin = TwinParams(ddp)
    perturb(model)  # the twin differs from the online weights, so the similarity term has a gradient
    settings = LossSettings.from_config(cfg, args.vocab_size)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10], [11, 12]]

    def step(rewards, responses, redistribution="success_scaled", drop=None):
        tokens, mask = pack_rows(prompts, responses)
        batch = PolicyBatch(tokens, mask, popo_weights(rewards, redistribution).reshape(-1), (rewards > 0).reshape(-1))
        if drop is not None:
            batch = batch.without_rows(drop)
        with twin.swapped_in():
            outputs = forward_only(ddp, batch.micro_batches(2), settings, hidden=True)
        batch = batch.with_fields(old_logprobs=torch.cat([o.logprobs for o in outputs]))
        ddp.zero_grad_buffer()
        metrics = forward_backward(
            ddp,
            batch.micro_batches(2),
            settings,
            loss_normalizers(batch, settings, all_response_tokens=float(batch.response_lengths().sum())),
            [o.hidden for o in outputs],
        )
        grad = torch.sqrt(sum(p.main_grad.double().pow(2).sum() for p in model.parameters())).item()
        return metrics.reduce(count_keys=True), grad, group_stats(rewards)

    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]
    none = torch.zeros(2, 2)
    reported, grad, stats = step(none, responses)
    assert reported["loss/total"] == 0.0 and math.isfinite(grad) and grad == 0.0, "no positives: no gradient"
    assert reported["popo/ratio/count"] == 0 and "popo/ratio" not in reported, "no ratio statistics without tokens"
    assert reported["popo/similarity/count"] == 0 and stats.groups_without_positives == 2

    all_correct = torch.ones(2, 2)
    reported, grad, stats = step(all_correct, responses)  # success_scaled: all-correct groups weigh 0 ...
    assert reported["loss/policy"] == 0.0 and reported["popo/ratio/count"] == 0 and stats.groups_all_positive == 2
    assert grad > 0 and reported["popo/similarity"] > 0, "... but their representations are still anchored"
    reported, grad, _ = step(all_correct, responses, "uniform")  # uniform: every prompt weighs the same
    assert reported["popo/ratio/count"] == sum(len(r) for r in responses) and grad > 0

    empty = [[], [], [24, 25], []]
    only_empty_positives = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    reported, grad, _ = step(only_empty_positives, empty)
    assert reported["loss/total"] == 0.0 and grad == 0.0, "positives without tokens: nothing to learn"

    # A positive cut at the length limit (it fills its row): in the loss by default, out with mask_truncated.
    long = [[20, 21], [23, 30, 31, 32, 33, 34], [24, 25], [26]]
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    reported, grad, _ = step(rewards, long)
    assert reported["popo/ratio/count"] == 6 and grad > 0
    reported, grad, _ = step(rewards, long, drop=torch.tensor([False, True, False, False]))
    assert reported["popo/ratio/count"] == 0 and grad == 0.0


def test_degenerate_batches_run_cleanly(tiny_models):
    run_local(_edge_worker, 1, str(tiny_models["qwen2_tied"]))
