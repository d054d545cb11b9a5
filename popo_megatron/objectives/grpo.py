"""GRPO, the baseline: group-normalised advantages and PPO's clipped surrogate (+ k3 KL to the initial policy).

    A_i = (r_i - mean_group) / (std_group + eps)            (grpo.advantage_std: population, sample or none)
    l_it = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high)) + kl_beta k3(pi_ref / pi)_it
    L = sum_it l_it / (response tokens)                       grpo.aggregation=token_mean (DAPO)
      = sum_i (sum_t l_it / |o_i|) / (responses)              grpo.aggregation=sequence_mean (TRL's "grpo")

over the global batch (every micro-batch and data-parallel rank), rho = pi / pi_old. Without a KL term the
rollouts of groups whose rewards are all equal (advantage 0) are left out of the passes; the normaliser
still counts them. With kl_beta > 0 the initial policy is kept as a frozen `target` (a reference forward
per step); it is not checkpointed: a resumed run rebuilds it from model.hf_path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from popo_megatron import metrics as m
from popo_megatron.algo.advantages import grpo_advantages, positive_mask
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.losses import grpo_per_token, safe_denominator
from popo_megatron.algo.step import Forwards
from popo_megatron.algo.twin import TwinParams
from popo_megatron.config.schema import GrpoAggregation
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.objectives.base import (
    MiniContext,
    Objective,
    ObjectiveContext,
    add_loss_share,
    logprob_settings,
    old_logprobs,
    tis_token_weights,
)


@dataclass
class GrpoContext(MiniContext):
    normalizer: float = 0.0  # the mini-batch's response tokens (token_mean) or responses (sequence_mean)


class GrpoObjective(Objective):
    name = "grpo"
    value_name = "advantage"

    def __init__(self, cfg: DictConfig, context: ObjectiveContext, model: torch.nn.Module) -> None:
        super().__init__(context)
        self.cfg = cfg
        self.settings = logprob_settings(context)
        if cfg.kl_beta > 0:
            self.target = TwinParams(model)  # the initial policy, frozen

    def positive(self, rewards: torch.Tensor) -> torch.Tensor:
        return positive_mask(rewards)

    def row_values(self, rewards: torch.Tensor) -> torch.Tensor:
        return grpo_advantages(rewards, self.cfg.advantage_std)

    def has_signal(self, rewards: Sequence[float]) -> bool:
        return max(rewards) != min(rewards)

    def dealt(self, batch: PolicyBatch) -> torch.Tensor:
        # Every rollout: each mini-batch's normaliser counts the same ones whether or not the flat ones train.
        return torch.ones(batch.size, dtype=torch.bool)

    def carries_gradient(self, batch: PolicyBatch) -> torch.Tensor:
        if self.cfg.kl_beta > 0:  # the KL term covers every rollout
            return torch.ones(batch.size, dtype=torch.bool)
        return batch.sample_weights != 0

    def prepare(
        self, step: PolicyBatch, mine: PolicyBatch, forwards: Forwards, metrics: MetricAccumulator
    ) -> tuple[PolicyBatch, torch.Tensor]:
        batch = mine.with_fields(old_logprobs=old_logprobs(mine, forwards, self.context, metrics))
        if self.target is not None:
            with self.target.swapped_in():
                outputs = forwards.in_update_rows(mine, self.context.mini_batches, logprobs=True)
            if outputs.logprobs is not None:
                batch = batch.with_fields(ref_logprobs=outputs.logprobs.cpu())
        return batch, step.sample_weights

    def mini_context(
        self, mini: PolicyBatch, tokens: float, responses: float, forwards: Forwards, update: int
    ) -> GrpoContext:
        token_mean = self.cfg.aggregation == GrpoAggregation.token_mean
        normalizer = tokens if token_mean else responses
        # A step on zero advantages is kept (Adam's moments move), as in GRPO's usual implementations.
        return GrpoContext(normalizer > 0, forwards.micro_batches(mini), normalizer=normalizer)

    def loss(
        self,
        index: int,
        mb: PolicyBatch,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        context: GrpoContext,
        metrics: MetricAccumulator,
    ) -> torch.Tensor:
        mask = mb.loss_mask
        lp, ent = self.settings.logprobs(logits, mb, with_entropy=True)
        metrics.add_masked(m.ENTROPY, ent, mask)
        if self.cfg.kl_beta > 0 and mb.ref_logprobs is None:
            raise ValueError("grpo.kl_beta > 0 needs the reference policy's log-probs in the batch (ref_logprobs)")
        per_token = grpo_per_token(
            lp,
            mb.old_logprobs,
            mask,
            mb.per_token(mb.sample_weights),
            self.cfg.eps_low,
            self.cfg.eps_high,
            mb.ref_logprobs,
            self.cfg.kl_beta,
            tis_token_weights(mb, self.context.loss, metrics),
            metrics,
        )
        if self.cfg.aggregation == GrpoAggregation.token_mean:
            total = per_token.sum()
        else:
            total = (mb.per_sequence_sum(per_token) / mb.per_sequence_sum(mask).clamp(min=1)).sum()
        loss = total / safe_denominator(context.normalizer)
        add_loss_share(metrics, m.LOSS_POLICY, loss, context)
        add_loss_share(metrics, m.LOSS_TOTAL, loss, context)
        return loss
