"""From a step's graded groups to this data-parallel rank's training rows.

A row that carries no gradient is left out of the batch, saving its forward
passes and backward. POPO trains on the positive rollouts only: a negative
has weight 0 and is not under the similarity penalty. GRPO without a KL term
leaves out its zero-advantage rollouts (every rollout of a group whose
rewards are all equal): their surrogate is 0 whatever the ratio. Its
token-mean still counts their tokens, so each mini-batch's normaliser is
taken from the rows it was dealt before they were left out, and the gradient
is exactly that of the whole batch (tested in tests/test_popo_step.py).

The rows are dealt to the data-parallel ranks in turn, each rank's share is
split into `train.mini_batches` consecutive slices, and every slice is padded
with empty rows (no loss token) to the same whole number of micro-batches
(or to one micro-batch of the busiest slice's rows when that is fewer than
`train.micro_batch_size`), so every rank runs the same schedule even in a
step with nothing to train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RankRows:
    """This data-parallel rank's rows of a step, and what its mini-batches stand for."""

    batch: PolicyBatch  # `train.mini_batches` equal consecutive slices
    # per mini-batch: the response tokens of every rollout it stands for over all data-parallel ranks, rows left
    # out included (POPO's all_tokens: an equal share of the step's rollouts; GRPO: the rows dealt to it)
    tokens: list[float]


def _carries_gradient(batch: PolicyBatch, cfg: DictConfig) -> torch.Tensor:
    """[B] bool: the rows whose loss terms can have a gradient."""
    if cfg.algorithm == Algorithm.popo:
        return batch.positive
    if cfg.grpo.kl_beta > 0:  # the KL term covers every rollout
        return torch.ones(batch.size, dtype=torch.bool)
    return batch.sample_weights != 0


def rank_rows(batch: PolicyBatch, cfg: DictConfig, dp: int, dp_rank: int) -> RankRows:
    """This data-parallel rank's rows of the step: `train.mini_batches` equal consecutive slices, each
    holding its share of the rows (in order) that carry a gradient, padded to a multiple of the micro-batch
    size (or, with fewer rows, to the busiest slice's: one micro-batch)."""
    popo = cfg.algorithm == Algorithm.popo
    minis, micro = cfg.train.mini_batches, cfg.train.micro_batch_size
    # POPO deals its positives (its normaliser does not depend on the deal); GRPO deals every rollout, so that
    # each mini-batch's token-mean counts the same rollouts whether or not the flat ones are left out.
    dealt = batch.positive if popo else torch.ones(batch.size, dtype=torch.bool)
    deals = [torch.tensor_split(dealt.nonzero().squeeze(-1)[rank::dp], minis) for rank in range(dp)]
    lengths = batch.response_lengths()
    if popo:
        tokens = [float(lengths.sum()) / minis] * minis
    else:
        tokens = [float(sum(lengths[deal[k]].sum() for deal in deals)) for k in range(minis)]
    keep = _carries_gradient(batch, cfg)
    kept = [[rows[keep[rows]] for rows in deal] for deal in deals]
    most = max(len(rows) for deal in kept for rows in deal)  # rows of the busiest mini-batch of any rank
    # A whole number of micro-batches, or one smaller micro-batch when fewer rows than `micro` train: a step
    # with 2 positives forwards 2 rows, not 2 and 6 of padding.
    per_mini = math.ceil(most / micro) * micro if most > micro else max(1, most)
    # Each mini-batch gets its share of the rows first, then padding: with few positives every optimiser step
    # still has some to learn from.
    shares = kept[dp_rank]
    index = torch.cat([torch.cat([s, torch.zeros(per_mini - len(s), dtype=torch.long)]) for s in shares])
    mine = batch[index]
    empty = torch.cat([torch.arange(per_mini) >= len(s) for s in shares])
    mine = mine.without_rows(empty).with_fields(
        sample_weights=torch.where(empty, 0.0, mine.sample_weights), positive=mine.positive & ~empty
    )
    tp = cfg.parallel.tensor_model_parallel_size
    return RankRows(mine.trimmed(tp if cfg.parallel.sequence_parallel else 1), tokens)
