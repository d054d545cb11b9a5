"""How a step's rollouts become each data-parallel rank's training rows (trainer/batching.py): which rows
train, how they are dealt and padded, and the token counts each mini-batch's normaliser stands for. Plain
tensors; the gradients these rows give are checked against transformers in test_popo_step.py."""

from __future__ import annotations

import pytest
import torch
from model_helpers import objective_without_model

from popo_megatron.algo.batch import make_policy_batch
from popo_megatron.config import load_config
from popo_megatron.trainer import batching


def _batch(rewards: list[list[float]], *overrides: str):
    # POPO without its entropy bonus (positives only) unless the test says otherwise; no EMA target.
    cfg = load_config(overrides=["model.hf_path=/unused", "popo.alpha=0", "popo.beta_ent=0", *overrides])
    groups, n = len(rewards), len(rewards[0])
    prompts = [[1, 2]] * (groups * n)
    responses = [[3] * (1 + i % 5) for i in range(groups * n)]  # 1-5 tokens
    objective = objective_without_model(cfg, n)
    rewards = torch.tensor(rewards)
    batch = make_policy_batch(prompts, responses, objective.row_values(rewards), objective.positive(rewards))
    return batch, (cfg, objective)


def rank_rows(batch, setup, dp: int, rank: int):
    cfg, objective = setup
    return batching.rank_rows(batch, objective.dealt(batch), objective.carries_gradient(batch), cfg, dp, rank)


def _real_rows(rows) -> int:
    return int(rows.batch.loss_mask.any(-1).sum())


def test_few_positives_train_in_one_small_micro_batch():
    """3 positives over DP=2 with micro-batches of 8: each rank forwards 2 rows (one of them padding on the
    second rank), not 8."""
    batch, cfg = _batch([[1, 0, 0, 0], [0, 1, 1, 0]], "train.micro_batch_size=8")
    sizes = [rank_rows(batch, cfg, 2, rank).batch.size for rank in range(2)]
    assert sizes == [2, 2]
    assert [_real_rows(rank_rows(batch, cfg, 2, rank)) for rank in range(2)] == [2, 1]


def test_many_positives_fill_whole_micro_batches():
    """20 positives, two mini-batches, micro-batches of 8: 10 rows a mini-batch, padded to 16 (2 micro-batches)."""
    batch, cfg = _batch([[1, 1, 1, 1, 1]] * 4 + [[0] * 5], "train.micro_batch_size=8", "train.mini_batches=2")
    rows = rank_rows(batch, cfg, 1, 0)
    assert rows.batch.size == 32 and _real_rows(rows) == 20


def test_a_step_without_positives_keeps_one_empty_row_per_mini_batch():
    batch, cfg = _batch([[0, 0, 0, 0]] * 2, "train.mini_batches=2")
    rows = rank_rows(batch, cfg, 2, 1)
    assert rows.batch.size == 2 and _real_rows(rows) == 0


@pytest.mark.parametrize("kl_beta, trained", [(0.0, 4), (0.04, 12)])
def test_grpo_trains_rows_with_an_advantage_unless_a_kl_term_covers_every_row(kl_beta, trained, monkeypatch):
    """Groups: one with a signal, one all wrong, one all right. Without KL only the first group's 4 rows
    train; the mini-batch still stands for every rollout's tokens (its token-mean's normaliser)."""
    monkeypatch.setattr("popo_megatron.objectives.grpo.TwinParams", lambda model: None)  # no model to copy here
    batch, cfg = _batch([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], "algorithm=grpo", f"grpo.kl_beta={kl_beta}")
    rows = rank_rows(batch, cfg, 1, 0)
    assert _real_rows(rows) == trained
    assert rows.tokens == [float(batch.loss_mask.sum())]


def test_popo_mini_batches_stand_for_an_equal_share_of_every_rollout():
    batch, cfg = _batch([[1, 0, 0, 1], [0, 0, 0, 0]], "train.mini_batches=2")
    rows = rank_rows(batch, cfg, 1, 0)
    assert rows.tokens == [float(batch.loss_mask.sum()) / 2] * 2
    assert rows.responses == [4.0, 4.0]


def test_popo_with_its_entropy_bonus_forwards_every_rollout():
    """The paper's entropy term covers every completion: the negatives train too, dealt like GRPO's rows."""
    batch, cfg = _batch([[1, 0, 0, 1], [0, 0, 0, 0]], "popo.beta_ent=0.01", "train.micro_batch_size=8")
    rows = rank_rows(batch, cfg, 2, 0)
    assert _real_rows(rows) == 4 and rows.batch.rows.tolist() == [0, 2, 4, 6]
    assert rows.tokens == [float(batch.loss_mask.sum())] and rows.responses == [8.0]


def test_packed_rows_are_dealt_by_tokens_and_stand_for_the_same_rollouts():
    """With a token budget the rows of each mini-batch that train are dealt to the ranks by tokens: every one
    exactly once, no rank's tokens above 4/3 of an equal share (here; the largest differencing method's bound
    is 4/3 of the best split), and the mini-batches stand for the same rollouts as when dealt in turn."""
    rewards = [[1, 1, 1, 1, 1, 1, 1, 1]] * 3
    batch, padded = _batch(rewards, "popo.beta_ent=0.01", "train.mini_batches=2")
    _, packed = _batch(rewards, "popo.beta_ent=0.01", "train.mini_batches=2", "train.max_tokens_per_microbatch=16")
    dp = 3
    in_turn = [rank_rows(batch, padded, dp, rank) for rank in range(dp)]
    by_tokens = [rank_rows(batch, packed, dp, rank) for rank in range(dp)]
    assert by_tokens[0].tokens == in_turn[0].tokens and by_tokens[0].responses == in_turn[0].responses
    lengths = batch.row_lengths()
    for k in range(2):
        dealt = [rows.batch.micro_batches(2)[k] for rows in by_tokens]
        trained = sorted(int(r) for mini in dealt for r in mini.rows if r >= 0)
        assert trained == list(range(12 * k, 12 * (k + 1))), f"mini-batch {k}: {trained}"
        loads = [int(lengths[mini.rows[mini.rows >= 0]].sum()) for mini in dealt]
        in_turn_loads = [int(lengths[r.batch.micro_batches(2)[k].rows].sum()) for r in in_turn]
        assert max(loads) <= max(in_turn_loads), (loads, in_turn_loads)
        assert max(loads) <= 4 / 3 * -(-sum(loads) // dp), loads
    # Padding rows are only what equal shapes need: the busiest share, not whole micro-batches.
    busiest = max(int((mini.rows >= 0).sum()) for r in by_tokens for mini in r.batch.micro_batches(2))
    assert all(r.batch.size == 2 * busiest for r in by_tokens)
