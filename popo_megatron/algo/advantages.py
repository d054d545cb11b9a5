"""Per-rollout weights from group rewards: POPO's redistribution and GRPO's advantages.

Rewards come as [groups, G]: G rollouts of each prompt. A rollout is positive
when its reward is > 0 (rewards are binary: 1 correct, 0 not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from popo_megatron import metrics as m
from popo_megatron.config.schema import AdvantageStd, Redistribution
from popo_megatron.metrics import MetricAccumulator

# Added to GRPO's group standard deviation (groups whose rewards are all equal have std 0).
GRPO_STD_EPS = 1e-6


def positive_mask(rewards: torch.Tensor) -> torch.Tensor:
    return rewards > 0


def popo_weights(rewards: torch.Tensor, redistribution: Redistribution | str) -> torch.Tensor:
    """w_i for every rollout of [groups, G] rewards; 0 for negatives and for groups without positives.

    k positives in a group of G, success rate p = k / G:
      uniform         1 / k
      success_scaled  (1 - p) / k          (all-correct groups weigh 0)
      grpo_matched    sqrt((1 - p) / p)    (GRPO's advantage of a positive with binary rewards)

    grpo_matched: earlier readings divided by G, a constant that cancels under the
    `positive_tokens` normaliser; without it, `all_tokens` gives exactly GRPO's
    gradient on the positives (tested in tests/test_popo_step.py).
    """
    positive = positive_mask(rewards)
    group_size = rewards.shape[-1]
    k = positive.sum(-1, keepdim=True).to(torch.float64)
    p = k / group_size
    has_positive = k > 0
    safe_k = k.clamp(min=1)
    if redistribution == Redistribution.uniform:
        per_group = 1.0 / safe_k
    elif redistribution == Redistribution.success_scaled:
        per_group = (1.0 - p) / safe_k
    else:
        per_group = torch.sqrt((1.0 - p) / p.clamp(min=1.0 / group_size))
    weights = torch.where(positive & has_positive, per_group, 0.0)
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


def group_stats(rewards: torch.Tensor) -> GroupStats:
    positive = positive_mask(rewards)
    k = positive.sum(-1)
    return GroupStats(
        rollouts=rewards.numel(),
        groups=rewards.shape[0],
        positives=int(k.sum()),
        groups_without_positives=int((k == 0).sum()),
        groups_all_positive=int((k == rewards.shape[-1]).sum()),
    )
