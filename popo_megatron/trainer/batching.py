"""From a step's graded groups to this data-parallel rank's training rows.

A row that carries no gradient is left out of the batch, saving its forward
passes and backward; the objective says which (`Objective.carries_gradient`).
POPO without its entropy bonus trains on the positive rollouts only: a
negative has weight 0 and no other term. GRPO without a KL term leaves out its
zero-advantage rollouts (every rollout of a group whose rewards are all
equal): their surrogate is 0 whatever the ratio. Its token-mean still counts
their tokens, so each mini-batch's normaliser is taken from the rows it was
dealt before they were left out, and the gradient is exactly that of the
whole batch (tested in tests/test_popo_step.py).

The rows (the objective's `dealt` ones) are dealt to the data-parallel ranks in turn, each rank's share is
split into `train.mini_batches` consecutive slices, and every slice is padded
with empty rows (no loss token) to the same whole number of micro-batches
(or to one micro-batch of the busiest slice's rows when that is fewer than
`train.micro_batch_size`), so every rank runs the same schedule even in a
step with nothing to train.

Packed (`train.max_tokens_per_microbatch`), a pass costs its tokens, not its rows: each mini-batch's rows
that train are dealt to the ranks by tokens (Karmarkar-Karp, algo/packing.py), so that no rank waits on
another's long tail; the padding rows carry no token and never enter a pack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from popo_megatron.algo.batch import PolicyBatch, make_policy_batch
from popo_megatron.algo.packing import balance_by_tokens
from popo_megatron.objectives.base import Objective
from popo_megatron.trainer.rollouts import Group


def step_batch(groups: list[Group], objective: Objective, cfg: DictConfig, pad_id: int) -> PolicyBatch:
    """Every rollout of the step as a training batch, each with the objective's reward-derived value (POPO's
    weight, GRPO's advantage) and whether it is positive."""
    rollouts = [r for g in groups for r in g.responses]
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    tp = cfg.parallel.tensor_model_parallel_size
    return make_policy_batch(
        [g.prompt for g in groups for _ in g.responses],
        [r.token_ids for r in rollouts],
        objective.row_values(rewards),
        objective.positive(rewards),
        torch.tensor([[r.truncated for r in g.responses] for g in groups]),
        [r.logprobs for r in rollouts],
        pad_id,
        length_multiple=tp if cfg.parallel.sequence_parallel else 1,
        mask_truncated=cfg.loss.mask_truncated,
    )


@dataclass(frozen=True)
class RankRows:
    """This data-parallel rank's rows of a step, and what its mini-batches stand for."""

    batch: PolicyBatch  # `train.mini_batches` equal consecutive slices
    # Per mini-batch, over all data-parallel ranks and rows left out included: the response tokens and the
    # responses of the rollouts it stands for (an equal share of the step's when only some rows are dealt,
    # e.g. POPO's positives; the rows dealt to it when every row is).
    tokens: list[float]
    responses: list[float]


def rank_rows(
    batch: PolicyBatch, dealt: torch.Tensor, keep: torch.Tensor, cfg: DictConfig, dp: int, dp_rank: int
) -> RankRows:
    """This data-parallel rank's rows of the step: `train.mini_batches` equal consecutive slices, each
    holding its share of the `dealt` rows (in order) that `keep` (those that carry a gradient), padded to a
    multiple of the micro-batch size (or, with fewer rows, to the busiest slice's: one micro-batch)."""
    minis, micro = cfg.train.mini_batches, cfg.train.micro_batch_size
    order = dealt.nonzero().squeeze(-1)
    if cfg.train.max_tokens_per_microbatch is None:  # in turn
        deals = [torch.tensor_split(order[rank::dp], minis) for rank in range(dp)]
        mini_rows = [torch.cat([deal[k] for deal in deals]) for k in range(minis)]
        kept = [[rows[keep[rows]] for rows in deal] for deal in deals]
    else:  # by tokens
        mini_rows = list(torch.tensor_split(order, minis))
        kept = [[] for _ in range(dp)]
        row_lengths = batch.row_lengths()
        for rows in mini_rows:
            training = rows[keep[rows]]
            for rank, share in enumerate(balance_by_tokens(row_lengths[training].tolist(), dp)):
                kept[rank].append(training[torch.tensor(share, dtype=torch.long)])
    lengths = batch.response_lengths()
    if bool(dealt.all()):
        tokens = [float(lengths[rows].sum()) for rows in mini_rows]
        responses = [float(len(rows)) for rows in mini_rows]
    else:
        tokens, responses = [float(lengths.sum()) / minis] * minis, [batch.size / minis] * minis
    most = max(len(rows) for deal in kept for rows in deal)  # rows of the busiest mini-batch of any rank
    # A whole number of micro-batches, or one smaller micro-batch when fewer rows than `micro` train: a step
    # with 2 positives forwards 2 rows, not 2 and 6 of padding.
    per_mini = math.ceil(most / micro) * micro if most > micro else max(1, most)
    if cfg.train.max_tokens_per_microbatch is not None:  # padding rows never enter a pack: no more than needed
        per_mini = max(1, most)
    # Each mini-batch gets its share of the rows first, then padding: with few positives every optimiser step
    # still has some to learn from.
    shares = kept[dp_rank]
    index = torch.cat([torch.cat([s, torch.zeros(per_mini - len(s), dtype=torch.long)]) for s in shares])
    mine = batch[index]
    empty = torch.cat([torch.arange(per_mini) >= len(s) for s in shares])
    mine = mine.without_rows(empty).with_fields(
        sample_weights=torch.where(empty, 0.0, mine.sample_weights),
        positive=mine.positive & ~empty,
        rows=None if mine.rows is None else torch.where(empty, -1, mine.rows),
    )
    tp = cfg.parallel.tensor_model_parallel_size
    return RankRows(mine.trimmed(tp if cfg.parallel.sequence_parallel else 1), tokens, responses)
