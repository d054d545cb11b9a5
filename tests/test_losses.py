"""POPO / GRPO loss math on plain tensors, each against an independent reference written here
(per-rollout, per-token loops in float64) or a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from popo_megatron.algo.advantages import group_stats, grpo_advantages, popo_weights
from popo_megatron.algo.batch import pack_rows, spread_per_token
from popo_megatron.algo.losses import (
    bounded_is_sum,
    grpo_per_token,
    per_token_distance_sum,
    pooled_similarity_sum,
    weighted_nll_sum,
)
from popo_megatron.config.schema import ISBoundConfig
from popo_megatron.metrics import Metric, MetricAccumulator, Reduce

REWARDS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],  # k = 1
        [1.0, 1.0, 0.0, 0.0],  # k = 2
        [0.0, 0.0, 0.0, 0.0],  # k = 0: no positives
        [1.0, 1.0, 1.0, 1.0],  # k = G: all positive
    ]
)


def _reference_weight(k: int, group: int, mode: str) -> float:
    p = k / group
    return {"uniform": 1 / k, "success_scaled": (1 - p) / k, "grpo_matched": math.sqrt((1 - p) / p)}[mode]


@pytest.mark.parametrize("mode", ["uniform", "success_scaled", "grpo_matched"])
def test_popo_weights_closed_form(mode):
    weights = popo_weights(REWARDS > 0, mode)
    for g, row in enumerate(REWARDS):
        k = int(row.sum())
        for i, reward in enumerate(row):
            expected = _reference_weight(k, len(row), mode) if reward > 0 else 0.0
            assert weights[g, i].item() == pytest.approx(expected, abs=1e-7), (mode, g, i)
    assert torch.all(weights[2] == 0), "a group without positives contributes nothing"
    if mode != "uniform":
        assert torch.all(weights[3] == 0), "an all-correct group carries no signal"


# Mean token log-probs of each rollout under the generating policy (the paper's lbar), one per reward above.
MEAN_LOGPROBS = torch.tensor(
    [[-0.5, -0.1, -2.0, -3.0], [-1.0, -0.2, -0.1, -9.0], [-1.0, -1.0, -1.0, -1.0], [-0.3, -0.6, -0.9, -1.2]]
)


def _reference_softmax(rewards, means, temperature=1.0, lengths=None):
    """The paper's Eq. 8 per group, written out: exp(lbar_i / T) over the sum for the group's positives,
    then, with lengths, w_i / |o_i| renormalised over the positives (the authors' option)."""
    out = []
    for g, row in enumerate(rewards.tolist()):
        positives = [i for i, r in enumerate(row) if r > 0]
        scores = {i: math.exp(means[g, i].item() / temperature) for i in positives}
        total = sum(scores.values())
        w = [scores[i] / total if i in scores else 0.0 for i in range(len(row))]
        if lengths is not None and positives:
            scaled = [w[i] / max(lengths[g, i].item(), 1) for i in range(len(row))]
            w = [x / sum(scaled) for x in scaled]
        out.append(w)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_softmax_weights_are_the_papers_and_have_no_edge_cases(temperature):
    weights = popo_weights(REWARDS > 0, "softmax", MEAN_LOGPROBS, temperature)
    assert torch.allclose(weights.double(), _reference_softmax(REWARDS, MEAN_LOGPROBS, temperature), atol=1e-7)
    assert torch.isfinite(weights).all()
    assert weights[0].tolist() == [1.0, 0.0, 0.0, 0.0], "one positive takes the whole weight"
    assert weights[1, 1] > weights[1, 0] > 0 and torch.all(weights[1, 2:] == 0), "more likely, more weight"
    assert torch.all(weights[2] == 0), "no positive: nothing"
    assert weights[3].sum().item() == pytest.approx(1.0) and torch.all(weights[3] > 0), "all positive: all weigh"
    sums = weights.sum(-1)
    assert sums.tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0]), "each group with a positive sums to 1"
    # Only the positives compete: a negative's log-prob changes nothing.
    moved = MEAN_LOGPROBS.clone()
    moved[1, 2] = 5.0
    assert torch.equal(popo_weights(REWARDS > 0, "softmax", moved, temperature), weights)


def test_length_normalised_weights():
    lengths = torch.tensor([[4, 1, 1, 1], [2, 8, 4, 1], [3, 3, 3, 3], [1, 2, 4, 0]])
    weights = popo_weights(REWARDS > 0, "softmax", MEAN_LOGPROBS, 1.0, lengths)
    assert torch.allclose(weights.double(), _reference_softmax(REWARDS, MEAN_LOGPROBS, 1.0, lengths), atol=1e-7)
    assert weights.sum(-1).tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])
    uniform = popo_weights(REWARDS > 0, "uniform", lengths=lengths)
    assert uniform[1, :2].tolist() == pytest.approx([0.8, 0.2]), "1/2 each, then / (2, 8), renormalised"


def test_grpo_matched_equals_grpo_weight_of_a_positive():
    """grpo_matched's w_i is GRPO's advantage of a positive rollout (binary rewards, population std)."""
    adv = grpo_advantages(REWARDS[:2])
    matched = popo_weights(REWARDS[:2] > 0, "grpo_matched")
    positive = REWARDS[:2] > 0
    assert torch.allclose(matched[positive], adv[positive], atol=1e-5)


def test_grpo_advantages_reference():
    for row, adv in zip(REWARDS.tolist(), grpo_advantages(REWARDS), strict=True):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        for r, a in zip(row, adv.tolist(), strict=True):
            assert a == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
    assert torch.allclose(grpo_advantages(REWARDS, "none"), REWARDS - REWARDS.mean(-1, keepdim=True))
    # The original GRPO: the sample standard deviation (divisor G - 1).
    for row, adv in zip(REWARDS.tolist(), grpo_advantages(REWARDS, "sample"), strict=True):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))
        for r, a in zip(row, adv.tolist(), strict=True):
            assert a == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)


def test_group_stats():
    stats = group_stats(REWARDS > 0)
    assert (stats.rollouts, stats.groups, stats.positives) == (16, 4, 7)
    assert (stats.groups_without_positives, stats.groups_all_positive) == (1, 1)
    metrics = MetricAccumulator()
    stats.add_to(metrics)
    group_stats(REWARDS[:1] > 0).add_to(metrics)  # e.g. another data-parallel rank's groups
    reported = metrics.reduce()
    assert reported["reward/positive_fraction"] == pytest.approx(8 / 20)
    assert (reported["reward/groups"], reported["reward/groups_without_positives"]) == (5, 1)


def _random_case(seed: int, rows: int = 6, seq: int = 7):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, seq, generator=gen) > 0.3
    old = -torch.rand(rows, seq, generator=gen) * 3
    logprobs = (old + 0.6 * torch.randn(rows, seq, generator=gen)).clamp(max=-1e-3).requires_grad_()
    return logprobs, old, mask


def _reference_popo(lp, old, mask, weights, mode, eps_high, c, denominator, token_weights=None):
    """Per rollout, per token, float64: -sum_i w_i sum_t s_it / denominator."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(lp.shape[0]):
        if weights[i] <= 0:
            continue
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            rho = torch.exp(lp[i, t].double() - old[i, t].double())
            if mode == "clip":
                s = torch.clamp(rho, max=1 + eps_high)
            else:
                s = torch.clamp(rho, max=c).detach() * lp[i, t].double()
            if token_weights is not None:
                s = s * token_weights[i, t]
            total = total + weights[i] * s
    return -total / denominator


@pytest.mark.parametrize("mode", ["clip", "truncate"])
def test_popo_loss_and_gradient_match_reference(mode):
    lp, old, mask = _random_case(0)
    weights = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.0, 0.3])
    token_weights = torch.rand(lp.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    denominator = float((weights * mask.sum(-1)).sum())
    metrics = MetricAccumulator()
    bound = ISBoundConfig(mode, 0.28, 2.0)
    loss = bounded_is_sum(lp, old, mask, weights.unsqueeze(-1), bound, token_weights, metrics) / denominator
    (grad,) = torch.autograd.grad(loss, lp)
    ref = _reference_popo(lp, old, mask, weights, mode, 0.28, 2.0, denominator, token_weights)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    # Rollouts with w = 0 (negatives) get no gradient at all.
    assert torch.all(grad[weights == 0] == 0)
    ratio = torch.exp(lp - old).detach()
    bound = 1.28 if mode == "clip" else 2.0
    active = mask & (weights > 0).unsqueeze(-1)
    reported = metrics.reduce()
    assert reported["popo/clip_fraction"] == pytest.approx((ratio[active] > bound).double().mean().item())
    assert reported["popo/ratio_max"] == pytest.approx(ratio[active].max().item(), rel=1e-6)
    if mode == "clip":
        # PPO's clip for a positive advantage: no gradient where rho > 1 + eps_high.
        clipped = active & (ratio > bound)
        assert clipped.any() and torch.all(grad[clipped] == 0)


def test_popo_loss_without_positives_is_zero_and_finite():
    lp, old, mask = _random_case(1)
    weights = torch.zeros(lp.shape[0])
    metrics = MetricAccumulator()
    loss = bounded_is_sum(lp, old, mask, weights.unsqueeze(-1), ISBoundConfig("clip"), metrics=metrics)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    reported = metrics.reduce(count_keys=True)
    assert "popo/ratio" not in reported and reported["popo/ratio/count"] == 0
    assert weighted_nll_sum(lp, mask, weights.unsqueeze(-1)).item() == 0.0


def test_weighted_nll_is_the_papers_and_shares_the_on_policy_gradient_of_the_bound():
    """sum_i w_i sum_t -log pi over the positives (w > 0); at rho = 1 (pi_old = pi) the bounded ratio's
    gradient is the same, whatever the bound."""
    lp, _, mask = _random_case(6)
    weights = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.0, 0.3])
    nll = weighted_nll_sum(lp, mask, weights.unsqueeze(-1))
    expected = sum(-weights[i] * lp[i, t] for i in range(6) for t in range(7) if mask[i, t] and weights[i] > 0)
    assert nll.item() == pytest.approx(float(expected.detach()), rel=1e-6)
    (grad,) = torch.autograd.grad(nll, lp)
    for mode in ("clip", "truncate"):
        surrogate = bounded_is_sum(lp, lp.detach(), mask, weights.unsqueeze(-1), ISBoundConfig(mode, 0.28, 2.0))
        (bounded,) = torch.autograd.grad(surrogate, lp)
        assert torch.allclose(bounded, grad, atol=1e-6), mode


def _reference_grpo(lp, old, mask, adv, eps_low, eps_high, denominator, ref=None, beta=0.0):
    total = torch.zeros((), dtype=torch.float64)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(lp[i, t].double() - old[i, t].double())
            clipped = min(max(ratio, torch.tensor(1 - eps_low)), torch.tensor(1 + eps_high))
            term = torch.maximum(-adv[i] * ratio, -adv[i] * clipped)
            if ref is not None:
                x = ref[i, t].double() - lp[i, t].double()
                term = term + beta * (torch.exp(x) - x - 1)
            total = total + term
    return total / denominator


def test_grpo_loss_and_gradient_match_reference():
    lp, old, mask = _random_case(2)
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5, 0.4, 2.0])
    ref_lp = old - 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    denominator = float(mask.sum())
    metrics = MetricAccumulator()
    per_token = grpo_per_token(lp, old, mask, adv.unsqueeze(-1), 0.2, 0.28, ref_lp, 0.05, metrics=metrics)
    loss = per_token.sum() / denominator
    (grad,) = torch.autograd.grad(loss, lp)
    ref = _reference_grpo(lp, old, mask, adv, 0.2, 0.28, denominator, ref_lp, 0.05)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert 0 < metrics.reduce()["grpo/clip_fraction"] < 1


def test_grpo_sequence_mean_is_trls_grpo_loss():
    """TRL's loss_type grpo: each sequence's mean over its tokens, then the mean over sequences."""
    lp, old, mask = _random_case(7)
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5, 0.4, 2.0])
    per_token = grpo_per_token(lp, old, mask, adv.unsqueeze(-1), 0.2, 0.2)
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / lp.shape[0]
    rows = [
        _reference_grpo(lp[i : i + 1], old[i : i + 1], mask[i : i + 1], adv[i : i + 1], 0.2, 0.2, 1.0) for i in range(6)
    ]
    means = [r / max(int(mask[i].sum()), 1) for i, r in enumerate(rows)]
    assert loss.item() == pytest.approx(float(sum(means) / 6), rel=1e-5)


def test_pooled_similarity_is_the_papers():
    """L_sim = -sum_i w_i cos(h(z_i), stopgrad(z~_i)) / sum_i w_i, rows with w = 0 ignored."""
    gen = torch.Generator().manual_seed(8)
    predicted = torch.randn(5, 16, generator=gen, requires_grad=True)
    target = torch.randn(5, 16, generator=gen, requires_grad=True)
    weights = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    value = pooled_similarity_sum(predicted, target, weights) / weights.sum()
    cos = [torch.dot(predicted[i], target[i]) / (predicted[i].norm() * target[i].norm()) for i in range(5)]
    expected = -sum(weights[i] * cos[i] for i in range(5)) / weights.sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert target.grad is None, "the target side is a stop-gradient"
    assert torch.all(predicted.grad[weights == 0] == 0) and predicted.grad[0].abs().max() > 0
    assert pooled_similarity_sum(target.detach(), target, weights).item() == pytest.approx(-1.0, rel=1e-6)


def test_similarity_penalty_is_bounded_and_pulls_towards_the_twin():
    gen = torch.Generator().manual_seed(4)
    twin = torch.randn(5, 3, 16, generator=gen)
    mask = torch.ones(5, 3, dtype=torch.bool)
    assert per_token_distance_sum(twin.clone(), twin, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert per_token_distance_sum(-twin, twin, mask).item() == pytest.approx(2.0 * 15, rel=1e-5)
    online = torch.randn(5, 3, 16, generator=gen).requires_grad_()
    total = per_token_distance_sum(online, twin, mask)
    assert 0 <= total.item() <= 2 * 15
    (grad,) = torch.autograd.grad(total, online)
    with torch.no_grad():
        assert per_token_distance_sum(online - 0.05 * grad, twin, mask) < total, "a gradient step reduces the distance"
    masked = mask.clone()
    masked[0] = False
    expected = total - per_token_distance_sum(online[:1], twin[:1], mask[:1])
    assert per_token_distance_sum(online, twin, masked).item() == pytest.approx(expected.item(), rel=1e-5)


def test_metric_accumulator_combines_means_totals_and_extremes():
    x, loss = Metric("x", Reduce.mean), Metric("loss", Reduce.total)
    a, b = MetricAccumulator(), MetricAccumulator()
    a.add_masked(x, torch.tensor([1.0, 5.0, 9.0]), torch.tensor([True, True, False]), extremes=True)
    b.add_masked(x, torch.tensor([3.0]), torch.tensor([True]), extremes=True)
    a.add_total(loss, 0.25)
    b.add_total(loss, 0.5)
    a.merge(b)
    out = a.reduce()
    assert out == {"loss": 0.75, "x": 3.0, "x_max": 5.0, "x_min": 1.0}
    with pytest.raises(ValueError, match="reduces by total, not mean"):
        a.add_mean(loss, 1.0, 1)


def test_pack_rows_masks_the_positions_that_predict_response_tokens():
    tokens, mask = pack_rows([[5, 6, 7], [8]], [[1, 2], []], pad_id=0, length_multiple=4)
    assert tokens.tolist() == [[5, 6, 7, 1, 2, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    # Position 2 (token 7) predicts response token 1; position 3 predicts 2.
    assert mask.tolist()[0] == [False, False, True, True, False, False, False, False]
    assert not mask[1].any(), "an empty response has no loss tokens"
    # A response that fills the row to the end (cut at the length limit) keeps all its tokens.
    tokens, mask = pack_rows([[5]], [[1, 2, 3]])
    assert tokens.shape == (1, 4) and mask.tolist() == [[True, True, True, False]]
    engine = spread_per_token(mask, [[-0.1, -0.2, -0.3]])
    assert engine[0].tolist() == pytest.approx([-0.1, -0.2, -0.3, 0.0])
    with pytest.raises(ValueError, match="row 0: 2 values for 3 response tokens"):
        spread_per_token(mask, [[-0.1, -0.2]])


def test_make_policy_batch():
    from popo_megatron.algo.batch import make_policy_batch

    prompts = [[5, 6], [5, 6], [7], [7]]
    responses = [[1, 2, 3], [4], [8, 9], []]
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    truncated = torch.tensor([[True, False], [False, False]])
    engine = [[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], []]
    values = popo_weights(rewards > 0, "uniform")
    batch = make_policy_batch(prompts, responses, values, rewards > 0, truncated, engine)
    assert batch.sample_weights.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert batch.positive.tolist() == [True, False, True, True] and batch.rows.tolist() == [0, 1, 2, 3]
    assert batch.response_lengths().tolist() == [3, 1, 2, 0]
    # The positions holding response tokens: the loss mask shifted by one (position t predicts token t + 1).
    assert batch.response_positions()[0].tolist()[:5] == [False, False, True, True, True]
    assert batch.rollout_logprobs[batch.loss_mask].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    masked = make_policy_batch(prompts, responses, values, rewards > 0, truncated, mask_truncated=True)
    assert masked.response_lengths().tolist() == [0, 1, 2, 0], "the truncated rollout carries no token"
    assert make_policy_batch(prompts, responses, values, rewards > 0, length_multiple=4).tokens.shape[1] % 4 == 0
    with pytest.raises(ValueError, match=r"must be \[groups, G\]"):
        make_policy_batch(prompts, responses, values.reshape(-1), rewards > 0)
    parts = batch.padded_micro_batches(3)
    assert [p.size for p in parts] == [3, 3] and parts[1].rows.tolist() == [3, -1, -1]
    assert not parts[1].loss_mask[1:].any() and parts[1].sample_weights[1:].tolist() == [0.0, 0.0]


def test_similarity_penalty_stops_the_gradient_at_the_twin():
    """d_t = 1 - cos(g(h_t), stopgrad(h_twin_t)): the twin side gets no gradient even when its hidden states
    carry a graph (they would without the detach: the same distance written without it sends one)."""
    gen = torch.Generator().manual_seed(3)
    online = torch.randn(5, 2, 8, generator=gen, requires_grad=True)
    twin_source = torch.randn(5, 2, 8, generator=gen, requires_grad=True)
    twin_hidden = twin_source * 1.5  # a tensor with a graph behind it, as a twin forward with grad would give
    mask = torch.tensor([[True, False]] * 5)
    per_token_distance_sum(online, twin_hidden, mask).backward()
    assert twin_source.grad is None, "the twin's side received a gradient"
    assert online.grad is not None and online.grad.abs().max() > 0

    without_detach = torch.nn.functional.cosine_similarity(online, twin_source * 1.5, dim=-1)
    torch.where(mask, 1.0 - without_detach, 0.0).sum().backward()
    assert twin_source.grad is not None and twin_source.grad.abs().max() > 0, "the check could not fail"


def test_target_noise_has_its_std_and_is_reproducible_from_the_seed():
    """The paper's eps ~ N(0, sigma^2) on the EMA target's features: drawn per rollout from (seed, optimiser
    step, the rollout's index in the step), so the same at every layout and in a resumed run."""
    from popo_megatron.objectives.popo import target_noise

    rows = torch.arange(64)
    noise = target_noise(rows, 512, 0.02, seed=1234, update=7)
    assert noise.shape == (64, 512)
    assert noise.std().item() == pytest.approx(0.02, rel=0.02) and abs(noise.mean().item()) < 1e-3
    assert torch.equal(noise, target_noise(rows, 512, 0.02, seed=1234, update=7)), "reproducible"
    # A row's noise does not depend on which other rows are drawn with it (another deal, another layout).
    assert torch.equal(target_noise(torch.tensor([5, 40]), 512, 0.02, 1234, 7), noise[[5, 40]])
    assert not torch.equal(target_noise(rows, 512, 0.02, seed=1234, update=8), noise), "a new draw each step"
    assert not torch.equal(target_noise(rows, 512, 0.02, seed=1, update=7), noise), "and per seed"
    assert torch.all(target_noise(rows, 8, 0.0, 1234, 7) == 0)
