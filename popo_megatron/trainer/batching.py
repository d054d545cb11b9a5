"""From a step's graded groups to this data-parallel rank's training rows.

POPO trains on the positive rollouts only: a negative has weight 0 and is
not under the similarity penalty, so leaving it out changes no gradient and
saves its forward and backward. GRPO trains on every rollout (its token-mean
counts the tokens of zero-advantage rollouts too). The rows are dealt to the
data-parallel ranks in turn and each rank's share is padded with empty rows
(no loss token) to a whole number of micro-batches per mini-batch, so every
rank runs the same schedule even in a step without positives.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from popo_megatron.algo.batch import PolicyBatch, make_policy_batch
from popo_megatron.config.schema import Algorithm
from popo_megatron.trainer.rollouts import Group


def step_batch(groups: list[Group], cfg: DictConfig, pad_id: int) -> PolicyBatch:
    """Every rollout of the step as a training batch (weights or advantages from the group rewards)."""
    n = len(groups[0].responses)
    rollouts = [r for g in groups for r in g.responses]
    return make_policy_batch(
        cfg,
        [g.prompt for g in groups for _ in range(n)],
        [r.token_ids for r in rollouts],
        torch.tensor([g.rewards for g in groups], dtype=torch.float32),
        torch.tensor([[r.truncated for r in g.responses] for g in groups]),
        [r.logprobs for r in rollouts],
        pad_id,
    )


def rank_rows(batch: PolicyBatch, cfg: DictConfig, dp: int, dp_rank: int) -> PolicyBatch:
    """This data-parallel rank's rows of the step: `train.mini_batches` equal consecutive slices, each
    holding an equal share of the rows (in order) and padded to a multiple of the micro-batch size."""
    train = batch.positive if cfg.algorithm == Algorithm.popo else torch.ones(batch.size, dtype=torch.bool)
    rows = train.nonzero().squeeze(-1)[dp_rank::dp]
    minis, micro = cfg.train.mini_batches, cfg.train.micro_batch_size
    most = math.ceil(math.ceil(int(train.sum()) / dp) / minis)  # rows of the busiest mini-batch of any rank
    per_mini = max(1, math.ceil(most / micro)) * micro
    # Each mini-batch gets its share of the real rows first, then padding (shares differ by at most one
    # row): with few positives every optimiser step still has some to learn from.
    shares = torch.tensor_split(rows, minis)
    index = torch.cat([torch.cat([s, torch.zeros(per_mini - len(s), dtype=torch.long)]) for s in shares])
    mine = batch[index]
    empty = torch.cat([torch.arange(per_mini) >= len(s) for s in shares])
    mine = mine.without_rows(empty).with_fields(
        sample_weights=torch.where(empty, 0.0, mine.sample_weights), positive=mine.positive & ~empty
    )
    tp = cfg.parallel.tensor_model_parallel_size
    return mine.trimmed(tp if cfg.parallel.sequence_parallel else 1)
