"""The metric registry, its documentation and what a real step produces.

docs/metrics.md documents every metric a step reports; the registry (popo_megatron/metrics.py) declares
them for the producers, the trainer and the logbook. The table and the registry must agree row for row,
and real steps of POPO (TP=1, with TIS) and GRPO (TP=2, with the KL to its reference policy) through the
training loop must produce every documented metric of their algorithm, finite, under the stated conditions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import records

from popo_megatron.config import load_config
from popo_megatron.metrics import METRICS, SKIPPED_UPDATES, Reduce

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "metrics.md"
EXAMPLES = ROOT / "examples"
# Small steps of the easy task (positives in most groups: every step has an update).
SMALL = [
    "train.steps=2",
    "train.prompts_per_step=8",
    "rollout.n=4",
    "train.micro_batch_size=8",
    "train.checkpoint_every=0",
    "reward.workers=1",
    "eval.data=null",
    "data.synthetic.max_operand=4",
    "reward.answer_fallbacks=[last_number]",
    "rollout.max_tokens=4",
]


def _documented() -> list[dict]:
    """The rows of docs/metrics.md's table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].startswith("`"):
            column, tag, reduce, where, algorithms, when, _ = cells
            rows.append(
                dict(
                    jsonl=column.strip("`") or None,
                    name=tag.strip("`"),
                    reduce=reduce,
                    where=where.replace(" ", "_"),
                    algorithms=tuple(a.strip() for a in algorithms.split(",")),
                    when="" if when == "every step" else when,
                )
            )
    return rows


def test_the_documented_table_is_the_registry():
    declared = [
        dict(
            jsonl=m.jsonl,
            name=m.name,
            reduce=m.reduce.value,
            where=m.where.value,
            algorithms=m.algorithms,
            when=m.when,
        )
        for m in METRICS.values()
    ]
    documented = _documented()
    assert len(documented) > 30, f"the table of {DOC} was not read"
    assert documented == declared


def _train(out: Path, config: Path, *overrides: str, nproc: int = 1) -> list[dict]:
    command = [sys.executable, "-m", "popo_megatron", "train", str(config), f"train.output_dir={out}", *overrides]
    command += ["--nproc", str(nproc)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert result.returncode == 0, f"popo train failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return records(out)


def _check_produced(history: list[dict], algorithm: str) -> None:
    """Every documented metric of the algorithm is in every record (its column) and measured, finite, in some
    step; nothing measured is infinite or NaN, and nothing measured is undeclared."""
    assert history, "no step was recorded"
    for record in history:
        undeclared = sorted(set(record["all"]) - set(METRICS))
        assert not undeclared, f"measured but not declared in popo_megatron/metrics.py: {undeclared}"
        bad = {k: v for k, v in record["all"].items() if not math.isfinite(v)}
        assert not bad, f"step {record['step']}: not finite: {bad}"
    columns = {m.jsonl for m in METRICS.values() if m.jsonl}
    for record in history:
        assert columns <= set(record), f"columns missing: {sorted(columns - set(record))}"
    # The two runs meet every condition but one: a mini-batch without signal is luck, not configuration.
    expected = [m for m in METRICS.values() if algorithm in m.algorithms and m.when != SKIPPED_UPDATES.when]
    missing = []
    for metric in expected:
        if metric.reduce == Reduce.none:
            values = [record[metric.jsonl] for record in history]
        else:
            values = [record["all"].get(metric.name, float("nan")) for record in history]
            values += [record[metric.jsonl] for record in history if metric.jsonl]
        if not any(math.isfinite(v) for v in values):
            missing.append(metric.name)
    assert not missing, f"{algorithm}: documented but never produced: {missing}"


def _grpo_advantages(rewards: list[float]) -> list[float]:
    """GRPO's (r - mean) / (std + 1e-6) with the population std (the DAPO-style example's), written out."""
    G = len(rewards)
    mean = sum(rewards) / G
    std = (sum((r - mean) ** 2 for r in rewards) / G) ** 0.5
    return [(r - mean) / (std + 1e-6) for r in rewards]


def _check_rollout_records(out: Path, history: list[dict], algorithm: str, responses: int, group_size: int) -> None:
    """train.save_rollouts: each step's file holds every response, and agrees with the step's metrics and with
    the weights (advantages) its rewards define."""
    key = "weight" if algorithm == "popo" else "advantage"
    for record in history:
        path = out / "rollouts" / f"step_{record['step']:06d}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == responses and {r["step"] for r in rows} == {record["step"]}
        assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(record["reward_mean"])
        assert sum(r["reason"] == "correct" for r in rows) == record["all"]["reward/correct"]
        assert all((r["reward"] == 1.0) == (r["reason"] == "correct") for r in rows)
        lengths = [len(r["response_ids"]) for r in rows]
        assert sum(lengths) / len(lengths) == pytest.approx(record["response_len_mean"])
        assert all(r["finish_reason"] in ("stop", "length") and r["prompt"] and r["trained"] for r in rows)
        for r in rows:
            if r["reason"] == "correct":  # what the grader read is the gold's value (literal answers only)
                assert int(r["extracted"]) == int(r["gold"]), r
        trained_tokens = 0
        for group in range(responses // group_size):
            mine = [r for r in rows if r["group"] == group]
            assert len(mine) == group_size and len({tuple(r["prompt_ids"]) for r in mine}) == 1
            values = [r[key] for r in mine]
            if algorithm == "popo":  # the paper's softmax over the positives: 0 elsewhere, 1 in all
                assert all((v > 0) == (r["reward"] > 0) for v, r in zip(values, mine, strict=True)), values
                assert sum(values) == pytest.approx(1.0 if any(v > 0 for v in values) else 0.0, abs=1e-5)
            else:
                expected = _grpo_advantages([r["reward"] for r in mine])
                assert values == pytest.approx(expected, abs=1e-5), f"step {record['step']} group {group}"
            # POPO with its entropy bonus trains on every rollout (else on its positives); GRPO without KL on
            # those with an advantage.
            if algorithm == "popo":
                entropy_bonus = load_config(EXAMPLES / "tiny_cpu.yaml").popo.beta_ent > 0
                carries = [entropy_bonus or r["reward"] > 0 for r in mine]
            else:
                carries = [v != 0 for v in values]
            trained_tokens += sum(len(r["response_ids"]) for r, c in zip(mine, carries, strict=True) if c)
        assert trained_tokens == record["trained_tokens"], "the rows trained on are the records' with a gradient"
        if algorithm == "popo" and record["positive_frac"] > 0:  # the weights the loss reported
            weights = [r[key] for r in rows if r[key] > 0]
            groups_with_a_positive = record["all"]["reward/groups"] - record["groups_without_positive"]
            assert sum(weights) == pytest.approx(groups_with_a_positive, abs=1e-4)
            assert max(weights) == pytest.approx(record["all"]["popo/weight_max"], abs=1e-6)
            assert min(weights) == pytest.approx(record["all"]["popo/weight_min"], abs=1e-6)


@pytest.mark.slow
def test_popo_steps_produce_every_documented_metric(tmp_path):
    out = tmp_path / "popo"
    heldout = ["eval.data=synthetic:heldout", "eval.k=2"]
    history = _train(
        out,
        EXAMPLES / "tiny_cpu.yaml",
        *SMALL,
        "loss.old_logprobs=trainer",
        "loss.rollout_correction=tis",
        "popo.is_bound.mode=clip",  # the ratio's metrics (an extension's)
        "popo.target.kl_every=1",  # the KL to the target at every optimiser step
        "train.save_rollouts=true",
        *heldout,
    )
    _check_produced(history, "popo")
    _check_rollout_records(out, history, "popo", responses=8 * 4, group_size=4)
    evaluations = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for evaluation in evaluations:  # the held-out samples, without weights, agree with the evaluation
        path = out / "rollouts" / f"heldout_step_{evaluation['step']:06d}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == evaluation["problems"] * 2 and not any("weight" in r for r in rows)
        assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(evaluation["avg_at_k"])


@pytest.mark.slow
def test_grpo_steps_through_the_loop_at_tp2(tmp_path):
    """GRPO through the real loop at TP=2: its batching (every rollout), the reference policy swapped in for
    the KL, and every documented GRPO metric."""
    out = tmp_path / "grpo"
    history = _train(
        out,
        EXAMPLES / "tiny_cpu_grpo_vanilla.yaml",
        *SMALL,
        "parallel.tensor_model_parallel_size=2",
        "loss.old_logprobs=trainer",
        "loss.rollout_correction=tis",
        nproc=2,
    )
    _check_produced(history, "grpo")
    assert len(history) == 2
    for record in history:  # the KL term covers every rollout: all of them train
        assert record["trained_tokens"] == pytest.approx(record["response_len_mean"] * 8 * 4)
    kl = [r["all"]["grpo/kl"] for r in history if "grpo/kl" in r["all"]]
    assert all(k >= 0 for k in kl) and max(kl) > 0, f"the KL to the frozen reference: {kl}"
    assert all(math.isnan(r["drift"]) and math.isnan(r["twin_momentum"]) for r in history), "GRPO has no EMA target"


@pytest.mark.slow
def test_dapo_grpo_leaves_out_flat_groups_at_dp2(tmp_path):
    """DAPO-style GRPO (no KL) through the loop at DP=2 trains on the groups whose rewards differ: a step with
    a flat group (all rewards equal, zero advantages) trains on fewer tokens than it generated, one without
    trains on all of them. (That the gradient is unchanged is tests/test_popo_step.py's.) Its rows are packed
    into micro-batches of 32 tokens and dealt to the two ranks by tokens."""
    out = tmp_path / "grpo"
    packed = "train.max_tokens_per_microbatch=32"
    history = _train(
        out,
        EXAMPLES / "tiny_cpu_grpo.yaml",
        *SMALL,
        "train.mini_batches=2",
        "train.save_rollouts=true",
        packed,
        nproc=2,
    )
    assert len(history) == 2
    # Rank 0 writes every rank's rows: the whole step, advantages included.
    _check_rollout_records(out, history, "grpo", responses=8 * 4, group_size=4)
    # Every rank holds every group: the rollouts' counts are the step's, not once per data-parallel rank.
    assert all(r["all"]["reward/groups"] == 8 for r in history)
    for record in history:
        generated = record["response_len_mean"] * 8 * 4
        flat = record["groups_without_positive"] + record["groups_all_positive"]
        if flat == 0:
            assert record["trained_tokens"] == pytest.approx(generated), record
        else:
            assert record["trained_tokens"] < generated, record
        if flat < 8:
            assert record["trained_tokens"] > 0 and math.isfinite(record["loss"]), record
    assert any(r["groups_without_positive"] + r["groups_all_positive"] > 0 for r in history), "no flat group"
