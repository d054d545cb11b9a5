"""POPO and GRPO losses of one micro-batch, as plain tensor functions.

Each returns this micro-batch's share of the step's loss: its sum over tokens
divided by a normaliser computed once for the whole global batch (every
micro-batch of every data-parallel rank), so that the step's loss is the sum
of the shares, whatever the split. Tensors are [B, S] per token (position t
predicts token t + 1, see popo_megatron.algo.batch) and [B] per rollout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from popo_megatron import metrics as m
from popo_megatron.config.schema import ISBoundConfig, ISBoundMode
from popo_megatron.metrics import MetricAccumulator


def safe_denominator(denominator: float) -> float:
    # A global batch with nothing to learn from (no positives, no tokens): every
    # numerator is 0 and so is the loss; no division by zero.
    return denominator if denominator > 0 else 1.0


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap) per token: the correction for the engine's numerical mismatch (TIS)."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap)


def popo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor,
    bound: ISBoundConfig,
    denominator: float,
    token_weights: torch.Tensor | None = None,
    metrics: MetricAccumulator | None = None,
) -> torch.Tensor:
    """-sum_i w_i sum_t s_it / denominator, with the bounded IS surrogate s over the rollouts with w_i > 0.

    denominator: sum_i w_i |o_i| over the global batch (token-level
    normalisation over positive tokens). token_weights: an optional detached
    per-token factor (the TIS correction).
    """
    mask = loss_mask & (weights > 0).unsqueeze(-1)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    if bound.mode == ISBoundMode.clip:
        # Gradient flows while rho < 1 + eps_high, none above: PPO's clip for a positive advantage.
        surrogate = ratio.clamp(max=1.0 + bound.eps_high)
        bounded = ratio > 1.0 + bound.eps_high
    else:
        surrogate = ratio.clamp(max=bound.truncate_c).detach() * torch.where(mask, logprobs, 0.0)
        bounded = ratio > bound.truncate_c
    if token_weights is not None:
        surrogate = surrogate * token_weights
    numerator = (weights.unsqueeze(-1) * torch.where(mask, surrogate, 0.0)).sum()
    if metrics is not None:
        metrics.add_masked(m.POPO_RATIO, ratio, mask, extremes=True)
        metrics.add_masked(m.POPO_CLIP_FRACTION, bounded.float(), mask)
    return -numerator / safe_denominator(denominator)


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    denominator: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    token_weights: torch.Tensor | None = None,
    metrics: MetricAccumulator | None = None,
) -> torch.Tensor:
    """Clipped surrogate with group-normalised advantages (+ beta * k3 KL to the reference), summed over
    response tokens / denominator (the global number of response tokens: token-level aggregation)."""
    ratio = torch.exp(torch.where(loss_mask, logprobs - old_logprobs, 0.0))
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    if ref_logprobs is not None and kl_beta > 0:
        # k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0, unbiased for KL(pi || pi_ref) under pi's samples.
        log_ref_ratio = torch.where(loss_mask, ref_logprobs - logprobs, 0.0)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        per_token = per_token + kl_beta * kl
        if metrics is not None:
            metrics.add_masked(m.GRPO_KL, kl, loss_mask)
    if metrics is not None:
        metrics.add_masked(m.GRPO_RATIO, ratio, loss_mask, extremes=True)
        metrics.add_masked(m.GRPO_CLIP_FRACTION, (clipped > unclipped).float(), loss_mask)
    return torch.where(loss_mask, per_token, 0.0).sum() / safe_denominator(denominator)


def similarity_sum(
    hidden: torch.Tensor,
    twin_hidden: torch.Tensor,
    mask: torch.Tensor,
    predictor: torch.nn.Module | None = None,
) -> torch.Tensor:
    """sum over masked tokens of d_t = 1 - cos(g(h_t), stopgrad(h_twin_t)), each d_t in [0, 2].

    hidden / twin_hidden: [..., H] final-norm outputs of the online network
    and the twin; mask: [...]. g is `predictor` (identity when None).
    Computed in fp32.
    """
    online = hidden.float()
    if predictor is not None:
        online = predictor(online)
    distance = 1.0 - F.cosine_similarity(online, twin_hidden.detach().float(), dim=-1)
    return torch.where(mask, distance, 0.0).sum()
