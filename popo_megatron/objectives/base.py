"""The interface of an RL objective: what the trainer asks of POPO, GRPO or any other.

The trainer (trainer/recipe.py) runs one pipeline for every objective and never branches on which:

    rewards [groups, G] -> `positive`, `row_values`         every rank: the step's batch (trainer/batching)
    `dealt`, `carries_gradient`                             which rows go to the data-parallel ranks, and train
    `prepare(step_batch, rows, forwards)`                   extra forwards before the update (pi_old, a
                                                            reference, POPO's weights) -> the rank's batch
    per mini-batch:
      `mini_context(mini, ...)`                             global normalisers (collective), a target's
                                                            features; `learns`: whether to step at all
      forward-backward with `loss(...)` per micro-batch     its share of the mini-batch's loss (last stage)
      the optimiser step (the policy and the objective's `head`, clipped together)
      `after_update(stepped, ...)`                          e.g. POPO's EMA target
    `step_values`, `state_dict`                             metrics.jsonl values, checkpointed state

An objective keeps what it needs beside the policy: `target` (a copy of the policy: POPO's EMA target,
GRPO's frozen reference; checkpointed when `saves_target`) and `head` (a trainable module on the last
pipeline stage, trained with the policy: POPO's predictor). Each reads its own config section and the
shared `loss` section (`ObjectiveContext`), never the whole config.

A new objective is one module of objectives/ with a subclass of Objective, registered in
objectives/__init__.py (docs/architecture.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from omegaconf import DictConfig

from popo_megatron import metrics as m
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.losses import truncated_is_weights
from popo_megatron.algo.step import Forwards, LogprobSettings
from popo_megatron.config.schema import OldLogprobs, RolloutCorrection
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.platform import collective_device

if TYPE_CHECKING:
    from popo_megatron.algo.predictor import ReplicatedHead
    from popo_megatron.algo.twin import TwinParams


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective needs from the run besides its own section."""

    loss: DictConfig  # the shared `loss` section
    optim: DictConfig  # the policy's optimiser settings (a head is trained with them)
    vocab_size: int
    hidden_size: int
    temperature: float  # the rollout's sampling temperature
    seed: int
    total_updates: int  # optimiser steps of the whole run
    group_size: int  # G, the rollouts per prompt (the step's rows come in groups of G)
    mini_batches: int  # optimiser steps per rollout step
    sequence_parallel: bool


@dataclass
class MiniContext:
    """What an objective computed for one mini-batch before its forward-backward (its subclasses add more)."""

    learns: bool  # the same on every rank: whether the mini-batch has anything to learn from
    micro_batches: list[PolicyBatch] = field(default_factory=list)  # the update's micro-batches
    captures_hidden: bool = False  # whether `loss` reads the final hidden states


class Objective(ABC):
    name: ClassVar[str]
    value_name: ClassVar[str]  # what a row's value is called in the rollout records ("weight", "advantage")

    def __init__(self, context: ObjectiveContext) -> None:
        self.context = context
        self.target: TwinParams | None = None
        self.saves_target = False
        self.head: ReplicatedHead | None = None  # on the last pipeline stage only
        self.uses_head = False  # on every rank: whether the run trains a head (its clip is collective)
        self.head_lr = 0.0  # the head's peak learning rate (the trainer applies the policy's schedule)
        self.low_entropy_warning = 0.0  # warn on the console when a step's mean entropy falls below (0: never)

    # --- the step's rows ---------------------------------------------------------------------------------
    @abstractmethod
    def positive(self, rewards: torch.Tensor) -> torch.Tensor:
        """[groups, G] bool: the positive rollouts."""

    @abstractmethod
    def row_values(self, rewards: torch.Tensor) -> torch.Tensor:
        """[groups, G] float: each rollout's value known from the rewards alone (`prepare` may refine it)."""

    @abstractmethod
    def has_signal(self, rewards: Sequence[float]) -> bool:
        """Whether a group can teach anything (data.dynamic_sampling keeps the groups that can)."""

    @abstractmethod
    def dealt(self, batch: PolicyBatch) -> torch.Tensor:
        """[B] bool: the rows dealt to the data-parallel ranks (what the mini-batches stand for)."""

    @abstractmethod
    def carries_gradient(self, batch: PolicyBatch) -> torch.Tensor:
        """[B] bool: the dealt rows that enter the update (the others are left out, saving their passes)."""

    # --- before the update -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(
        self, step: PolicyBatch, mine: PolicyBatch, forwards: Forwards, metrics: MetricAccumulator
    ) -> tuple[PolicyBatch, torch.Tensor]:
        """This rank's batch `mine` (rows of `step`, the whole step's batch every rank holds) ready for the
        update, and the step's per-row values as the loss uses them ([step rows], on every rank). Collective."""

    @abstractmethod
    def mini_context(
        self, mini: PolicyBatch, tokens: float, responses: float, forwards: Forwards, update: int
    ) -> MiniContext:
        """The context of mini-batch `mini` (this rank's rows; `tokens` / `responses`: what it stands for over
        all ranks, trainer/batching.RankRows) for the run's optimiser step number `update`. Collective."""

    # --- the update ----------------------------------------------------------------------------------------
    @abstractmethod
    def loss(
        self,
        index: int,
        mb: PolicyBatch,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        context: MiniContext,
        metrics: MetricAccumulator,
    ) -> torch.Tensor:
        """Micro-batch `index`'s share of the mini-batch's loss (last pipeline stage)."""

    def after_update(self, stepped: bool, metrics: MetricAccumulator) -> None:
        """After a mini-batch (`stepped`: the optimiser stepped). Collective where the objective's state is."""
        return None  # by default nothing follows the optimiser step

    # --- what the run reports and keeps ----------------------------------------------------------------
    def step_values(self) -> dict[str, float]:
        """The objective's metrics.jsonl values of the step (popo_megatron.metrics.STEP_VALUES)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None  # by default the objective keeps no state


# --- what the objectives share ---------------------------------------------------------------------------
def logprob_settings(context: ObjectiveContext) -> LogprobSettings:
    return LogprobSettings(context.vocab_size, context.temperature, context.loss.logprob_chunk_tokens)


def uses_trainer_logprobs(loss_cfg: DictConfig) -> bool:
    """pi_old comes from a trainer forward (loss.old_logprobs=trainer, or the TIS correction needs it)."""
    return loss_cfg.old_logprobs == OldLogprobs.trainer or loss_cfg.rollout_correction == RolloutCorrection.tis


def old_logprobs(
    mine: PolicyBatch, forwards: Forwards, context: ObjectiveContext, metrics: MetricAccumulator
) -> torch.Tensor | None:
    """pi_old of every row of `mine` [B, S]: a trainer forward in the update's shapes (so an on-policy ratio is
    exactly 1; its mismatch with the engine's log-probs is logged), or the engine's log-probs. None on the
    pipeline stages before the last."""
    from megatron.core import parallel_state

    if not uses_trainer_logprobs(context.loss):
        return mine.rollout_logprobs
    outputs = forwards.in_update_rows(mine, context.mini_batches, logprobs=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    old = outputs.logprobs.cpu()
    if mine.rollout_logprobs is not None:
        add_logprob_mismatch(old, mine.rollout_logprobs, mine.loss_mask, metrics)
    return old


def add_logprob_mismatch(
    trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, metrics: MetricAccumulator
) -> None:
    """The trainer's pi_old against the engine's sampled-token log-probs: their numerical mismatch."""
    mismatch = (trainer - engine).abs()
    metrics.add_masked(m.LOGPROB_MISMATCH, mismatch, mask)
    metrics.add_max(m.LOGPROB_MISMATCH_MAX, torch.where(mask, mismatch, 0.0).max() if mask.any() else 0.0)


def tis_token_weights(mb: PolicyBatch, loss_cfg: DictConfig, metrics: MetricAccumulator) -> torch.Tensor | None:
    """The TIS correction min(pi_old / pi_rollout, cap) per token (loss.rollout_correction=tis), else None."""
    if loss_cfg.rollout_correction != RolloutCorrection.tis:
        return None
    if mb.rollout_logprobs is None or mb.old_logprobs is None:
        raise ValueError("loss.rollout_correction=tis needs the trainer's and the engine's log-probs in the batch")
    mask = mb.loss_mask
    weights = torch.where(mask, truncated_is_weights(mb.old_logprobs, mb.rollout_logprobs, loss_cfg.tis_cap), 1.0)
    metrics.add_masked(m.TIS_WEIGHT, weights, mask)
    return weights


def add_loss_share(metrics: MetricAccumulator, metric: m.Metric, value: torch.Tensor, context: MiniContext) -> None:
    """A micro-batch's share of a mini-batch's loss term as a step metric: the mean over the step's mini-batches
    of each one's global value (the shares of all micro-batches and ranks have counts adding up to 1)."""
    from megatron.core import parallel_state

    share = 1.0 / (len(context.micro_batches) * parallel_state.get_data_parallel_world_size())
    metrics.add_mean(metric, value.detach(), share)


def global_sums(values: list[torch.Tensor | float]) -> list[float]:
    """Sums over the data-parallel group of this rank's values (collective over it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return sums.tolist()
