"""Per-rollout weights from group rewards: POPO's redistribution and GRPO's advantages.

Rewards come as [groups, G]: G rollouts of each prompt. A rollout is positive
when its reward is above a threshold (0: rewards are binary, 1 correct, 0 not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from popo_megatron import metrics as m
from popo_megatron.config.schema import AdvantageStd, PopoWeights
from popo_megatron.metrics import MetricAccumulator

# Added to GRPO's group standard deviation (groups whose rewards are all equal have std 0).
GRPO_STD_EPS = 1e-6


def positive_mask(rewards: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """A rollout is positive when its reward is above `threshold` (the paper's tau_r)."""
    return rewards > threshold


def popo_weights(
    positive: torch.Tensor,
    mode: PopoWeights | str,
    mean_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """w_i for every rollout of [groups, G]: 0 for negatives and in groups without positives.

    For the k positives of a group of G (success rate p = k / G):
      softmax         softmax over the positives of lbar_i / temperature, lbar_i the rollout's mean token
                      log-prob under the generating policy (`mean_logprobs` [groups, G]): the paper's
      uniform         1 / k (the paper's ablation)
      success_scaled  (1 - p) / k          (all-correct groups weigh 0)
      grpo_matched    sqrt((1 - p) / p)    (GRPO's advantage of a positive with binary rewards)
    With `lengths` [groups, G] (the paper's option) each weight is divided by its response's length and the
    group's positives are renormalised to the sum they had. Computed in float64, returned as float32.
    """
    k = positive.sum(-1, keepdim=True).to(torch.float64)
    has_positive = k > 0
    safe_k = k.clamp(min=1)
    if mode == PopoWeights.softmax:
        if mean_logprobs is None:
            raise ValueError("softmax weights need the generating policy's mean log-probs")
        scores = torch.where(positive, mean_logprobs.to(torch.float64) / temperature, float("-inf"))
        # A group without positives is all -inf: its softmax is NaN, zeroed below.
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    else:
        p = k / positive.shape[-1]
        if mode == PopoWeights.uniform:
            per_group = 1.0 / safe_k
        elif mode == PopoWeights.success_scaled:
            per_group = (1.0 - p) / safe_k
        else:
            per_group = torch.sqrt((1.0 - p) / p.clamp(min=1.0 / positive.shape[-1]))
        weights = torch.where(positive, per_group, 0.0)
    weights = torch.where(positive & has_positive, weights, 0.0)
    if lengths is not None:
        total = weights.sum(-1, keepdim=True)
        scaled = weights / lengths.to(torch.float64).clamp(min=1)
        weights = scaled * total / scaled.sum(-1, keepdim=True).clamp(min=1e-300)
    return weights.to(torch.float32)


def grpo_advantages(rewards: torch.Tensor, std: AdvantageStd | str = AdvantageStd.population) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for [groups, G] rewards, with the population std (divisor G,
    as in grpo_matched's derivation) or the sample std (G - 1, the original GRPO); `none`: r - mean (Dr. GRPO)."""
    rewards = rewards.to(torch.float64)
    centred = rewards - rewards.mean(-1, keepdim=True)
    if std != AdvantageStd.none:
        correction = 0 if std == AdvantageStd.population else 1
        centred = centred / (rewards.std(-1, keepdim=True, correction=correction) + GRPO_STD_EPS)
    return centred.to(torch.float32)


@dataclass(frozen=True)
class GroupStats:
    """What the rewards of a batch say, before any gradient (logged every step)."""

    rollouts: int
    groups: int
    positives: int
    groups_without_positives: int
    groups_all_positive: int

    def add_to(self, metrics: MetricAccumulator) -> None:
        """As step metrics (reduce them over the data-parallel group for the global batch's values)."""
        metrics.add_mean(m.POSITIVE_FRACTION, self.positives, self.rollouts)
        metrics.add_total(m.GROUPS_WITHOUT_POSITIVES, self.groups_without_positives)
        metrics.add_total(m.GROUPS_ALL_POSITIVE, self.groups_all_positive)
        metrics.add_total(m.GROUPS, self.groups)


def group_stats(positive: torch.Tensor) -> GroupStats:
    """What a batch's [groups, G] positive mask says about its groups."""
    k = positive.bool().sum(-1)
    return GroupStats(
        rollouts=positive.numel(),
        groups=positive.shape[0],
        positives=int(k.sum()),
        groups_without_positives=int((k == 0).sum()),
        groups_all_positive=int((k == positive.shape[-1]).sum()),
    )
