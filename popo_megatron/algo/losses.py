"""The loss terms of POPO and GRPO on one micro-batch, as plain tensor functions.

Each returns a sum over this micro-batch's rows and tokens; the objective divides it by a normaliser
computed once for the global batch (every micro-batch of every data-parallel rank, objectives/), so that
the step's loss is the sum of the micro-batches' shares whatever the split. Tensors are [P, T] per token
(position t predicts token t + 1, see popo_megatron.algo.batch); a rollout's weight or advantage comes as
its value at each of its tokens (`PolicyBatch.per_token`: [B, 1] for padded rows, [P, T] for packs).
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


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - x - 1 >= 0 for x = log(pi_other / pi): unbiased for KL(pi || pi_other) under pi's samples."""
    return torch.exp(log_ratio) - log_ratio - 1.0


def weighted_nll_sum(logprobs: torch.Tensor, loss_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i sum_t -log pi(o_it): the paper's policy term before its normaliser N+ (`weights`: w_i at
    each token of rollout i)."""
    active = loss_mask & (weights > 0)
    return -(weights * torch.where(active, logprobs, 0.0)).sum()


def bounded_is_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor,
    bound: ISBoundConfig,
    token_weights: torch.Tensor | None = None,
    metrics: MetricAccumulator | None = None,
) -> torch.Tensor:
    """-sum_i w_i sum_t s_it with the bounded IS surrogate s over the rollouts with w_i > 0 (ours:
    popo.is_bound, for stale rollouts or several optimiser steps per rollout batch). On-policy (rho = 1) its
    gradient is the weighted NLL's. `weights`: w_i at each token of rollout i; token_weights: an optional
    detached per-token factor (the TIS correction)."""
    mask = loss_mask & (weights > 0)
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
    if bound.mode == ISBoundMode.clip:
        # Gradient flows while rho < 1 + eps_high, none above: PPO's clip for a positive advantage.
        surrogate = ratio.clamp(max=1.0 + bound.eps_high)
        bounded = ratio > 1.0 + bound.eps_high
    else:
        surrogate = ratio.clamp(max=bound.truncate_c).detach() * torch.where(mask, logprobs, 0.0)
        bounded = ratio > bound.truncate_c
    if token_weights is not None:
        surrogate = surrogate * token_weights
    if metrics is not None:
        metrics.add_masked(m.POPO_RATIO, ratio, mask, extremes=True)
        metrics.add_masked(m.POPO_CLIP_FRACTION, bounded.float(), mask)
    return -(weights * torch.where(mask, surrogate, 0.0)).sum()


def pooled_similarity_sum(predicted: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum_i w_i cos(h(z_i), stopgrad(z~_i)) over rows [B, H] (the paper's L_sim before its normaliser
    sum_i w_i); rows with w_i = 0 add nothing."""
    cos = F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1)
    return -torch.where(weights > 0, weights * cos, 0.0).sum()


def per_token_distance_sum(
    hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    mask: torch.Tensor,
    predictor: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Ours: sum over masked tokens of d_t = 1 - cos(g(h_t), stopgrad(h_target_t)), each d_t in [0, 2].

    hidden / target_hidden: [..., H] final-norm outputs of the online network and the EMA target; mask:
    [...]. g is `predictor` (identity when None). Computed in fp32."""
    online = hidden.float()
    if predictor is not None:
        online = predictor(online)
    distance = 1.0 - F.cosine_similarity(online, target_hidden.detach().float(), dim=-1)
    return torch.where(mask, distance, 0.0).sum()


def grpo_per_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    token_weights: torch.Tensor | None = None,
    metrics: MetricAccumulator | None = None,
) -> torch.Tensor:
    """[P, T] per-token GRPO loss, 0 outside the mask: the clipped surrogate with group-normalised advantages
    (`advantages`: each rollout's at each of its tokens; + kl_beta * k3 KL to the reference). The objective
    aggregates it (token or sequence mean)."""
    ratio = torch.exp(torch.where(loss_mask, logprobs - old_logprobs, 0.0))
    adv = advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    if ref_logprobs is not None and kl_beta > 0:
        kl = k3(torch.where(loss_mask, ref_logprobs - logprobs, 0.0))
        per_token = per_token + kl_beta * kl
        if metrics is not None:
            metrics.add_masked(m.GRPO_KL, kl, loss_mask)
    if metrics is not None:
        metrics.add_masked(m.GRPO_RATIO, ratio, loss_mask, extremes=True)
        metrics.add_masked(m.GRPO_CLIP_FRACTION, (clipped > unclipped).float(), loss_mask)
    return torch.where(loss_mask, per_token, 0.0)
