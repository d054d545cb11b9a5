"""The trainer end to end on CPU: real megatron-core, real vLLM, real math-verify, the synthetic task.

- TP=2 and PP=2: steps run, metrics are finite, and after every step the weights vLLM samples from
  are the trainer's (the engine's log-probs of fresh samples equal the trainer's forward).
- `popo train` learns: on held-out problems the main job ends far above the best prompt-blind answer
  (fixed seed, generous margin), and the run leaves metrics.jsonl, eval.jsonl, TensorBoard events, a
  learning curve and checkpoints.
- Resume at another layout gives the same loss at the first resumed step, also when the layout changes
  the KV heads' replication (through `popo convert mcore-reshard`). (Exact resume after SIGTERM and
  SIGKILL: tests/test_faults.py.)
- A resumed run reports the settings it changes, refuses those its checkpoint depends on, and a complete
  run says so instead of training nothing.
- A crash while a checkpoint is written leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import EASY, EXAMPLE, SMALL, checkpoint_tensors, records

from popo_megatron.config import load_config
from popo_megatron.launch import run_local
from popo_megatron.trainer.logbook import EVAL_JSONL, read_metrics

LOGPROB_TOLERANCE = 1e-4


def _check_engine_serves_trainer_weights(state, step: int) -> None:
    from megatron.core import parallel_state

    from popo_megatron.algo.batch import PolicyBatch, pack_rows
    from popo_megatron.rollout.engine import SamplingSettings

    prompts = [[3, 12, 4, 15], [5, 13, 2, 15]]
    settings = state.forwards.settings
    sampling = SamplingSettings(n=3, temperature=settings.temperature, top_p=1.0, max_tokens=4, top_k=0)
    generation = state.engine.generate(prompts, sampling, seed=77)
    rows_p = [p for p, g in zip(prompts, generation.responses, strict=True) for _ in g]
    rows_r = [r.token_ids for g in generation.responses for r in g]
    served = torch.tensor([lp for g in generation.responses for r in g for lp in r.logprobs])
    tokens, mask = pack_rows(rows_p, rows_r)
    batch = PolicyBatch(tokens, mask, torch.zeros(len(rows_p)), torch.zeros(len(rows_p), dtype=torch.bool))
    outputs = state.forwards.rows(batch)  # in the trainer's micro-batches (padded, or packed)
    if parallel_state.is_pipeline_last_stage():
        diff = (outputs.logprobs[mask] - served).abs().max().item()
        assert diff < LOGPROB_TOLERANCE, f"after step {step}: vLLM serves other weights than the trainer's ({diff})"


def _e2e_worker(model: str, out: str, tp: int, pp: int, cp: int) -> None:
    from megatron.core import parallel_state

    from popo_megatron.config import load_config
    from popo_megatron.trainer.recipe import Recipe

    cfg = load_config(
        EXAMPLE,
        [
            f"model.hf_path={model}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.context_parallel_size={cp}",
            # CP splits packed sequences: packs of 32 tokens (the rows are 5-6)
            f"train.max_tokens_per_microbatch={32 if cp > 1 else 'null'}",
            f"train.output_dir={out}",
            f"data.dynamic_sampling={tp == 2}",  # TP=2 also runs DAPO's dynamic sampling
            f"popo.adaptive_alpha.enabled={tp == 2}",  # and the adaptive similarity weight
            "optim.lr_decay_style=linear",  # the predictor's rate follows the policy's schedule
            *SMALL,
        ],
    )
    state = Recipe(cfg).setup()
    try:
        _check_engine_serves_trainer_weights(state, 0)
        before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        for step in range(2):
            record = state.train_step(step)
            measured = ["reward_mean", "positive_frac", "response_len_mean", "time_step_s", "tokens_per_s"]
            if record["positive_frac"] > 0:  # the loss, its terms and the entropy exist where there is a positive
                measured += ["loss", "pos_loss", "nll", "sim_loss", "ent_loss", "drift", "entropy", "twin_momentum"]
            for key in measured:
                assert math.isfinite(record[key]), f"step {step + 1}: {key} = {record[key]}"
            if tp == 2 and record["positive_frac"] > 0:  # the adaptive alpha moved with the measured drift
                assert record["alpha"] != cfg.popo.alpha
            rounds = record["all"]["data/rounds"]
            assert rounds >= 1 and (rounds == 1 or tp == 2), "only dynamic sampling samples more than once"
            _check_engine_serves_trainer_weights(state, step + 1)
        moved = any(not torch.equal(p, before[n]) for n, p in state.model.named_parameters())
        assert moved, "two steps changed no weight"
        head = state.objective.head
        assert (head is not None) == parallel_state.is_pipeline_last_stage(), "the predictor: on the last stage"
        if head is not None:  # trained with the policy, at its rate and schedule (the paper)
            from popo_megatron.algo.predictor import MLPPredictor

            fresh = MLPPredictor(state.args.hidden_size, cfg.popo.predictor.hidden, cfg.popo.predictor.layers, cfg.seed)
            moved = [
                not torch.equal(a, b.to(a.device)) for a, b in zip(head.parameters(), fresh.parameters(), strict=True)
            ]
            assert all(moved), "a predictor parameter stayed at its initial value"
            rate, policy = state.head_optimizer.param_groups[0]["lr"], state.optimizer.param_groups[0]["lr"]
            assert policy < cfg.optim.lr and rate == pytest.approx(policy), "it decays with the policy's"
    finally:
        state.close()


@pytest.mark.parametrize("tp,pp,cp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "cp2"])
def test_steps_run_and_vllm_serves_the_trainers_weights(arith_model, tmp_path, tp, pp, cp):
    run_local(_e2e_worker, tp * pp * cp, str(arith_model), str(tmp_path / "run"), tp, pp, cp)


def _popo_train(
    out: Path, model: Path, *overrides: str, nproc: int | None = None, config: Path = EXAMPLE
) -> subprocess.Popen:
    """`popo train` on the tiny example as its own process session (so a test can signal it)."""
    command = [
        sys.executable,
        "-m",
        "popo_megatron",
        "train",
        str(config),
        f"model.hf_path={model}",
        f"train.output_dir={out}",
        *overrides,
    ]
    if nproc:
        command += ["--nproc", str(nproc)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _finish(process: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    returncode = process.wait(timeout=timeout)
    log = (out.parent / f"{out.name}.log").read_text(errors="replace")
    assert returncode == 0, f"popo train failed ({returncode}):\n{log[-4000:]}"


def _check_the_target_follows_the_papers_law(history: list[dict]) -> None:
    """The paper's EMA target: a fixed momentum tau at every step, its KL to the policy logged every
    popo.target.kl_every optimiser steps, and a drift that stays finite and below its bound."""
    target = load_config(EXAMPLE).popo.target
    assert all(r["twin_momentum"] == target.tau for r in history)
    logged = [r["step"] for r in history if math.isfinite(r["kl_to_target"])]
    assert len(logged) >= len(history) // target.kl_every and all(
        r["kl_to_target"] >= 0 for r in history if r["step"] in logged
    )
    assert all(0 <= r["drift"] <= 2 for r in history if math.isfinite(r["drift"]))


# The main job's schedule cut to the steps where its held-out curve rises (250 of 450: 0.739 at the end
# with this seed, bench/results/main_job_length.json), the warm-up its 10%. About 4 min on a 2-core
# machine; the limits catch a hang, not a slow machine.
MAIN_JOB_TEST = ["train.steps=250", "optim.lr_warmup_steps=50", "train.checkpoint_every=0"]


@pytest.mark.timeout(1800)
def test_main_job_learns_and_its_target_follows_the_papers_law(arith_model, tmp_path):
    """The embedded default (the demo's seed, model and settings, on a shorter schedule): on problems it never
    trained on, the policy beats the best prompt-blind answer by a wide margin, in the run's own evaluation
    and in `popo eval` of the exported checkpoint (another process, another engine, other seeds)."""
    out = tmp_path / "learn"
    _finish(_popo_train(out, arith_model, *MAIN_JOB_TEST), out, timeout=1500)
    history = records(out)
    steps = len(history)
    assert [r["step"] for r in history] == list(range(1, steps + 1)) and steps >= 100
    heldout = read_metrics(out / EVAL_JSONL)
    every = load_config(EXAMPLE).eval.every
    assert [h["step"] for h in heldout] == list(range(0, steps + 1, every)), "evaluated at start, every, end"
    start, end = heldout[0], heldout[-1]
    blind = end["prompt_blind"]
    assert blind <= 0.25 and start["avg_at_k"] < blind, "the task is not guessable, the random model cannot do it"
    assert end["avg_at_k"] >= blind + 0.5, f"held-out avg@4 {end['avg_at_k']:.3f}, prompt-blind best {blind:.3f}"
    _check_the_target_follows_the_papers_law(history)
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    log = (tmp_path / "learn.log").read_text()
    assert f"step {steps}/{steps} | reward" in log and f"held-out after step {steps}: avg@4" in log
    assert "held-out, best prompt-blind answer" in log, "the summary compares with the baseline"

    # popo eval: the trained checkpoint exported on the fly, with the run's stored settings; the run's
    # directory stands for its newest checkpoint.
    command = [sys.executable, "-m", "popo_megatron", "eval", str(out)]
    command += ["--benchmark", "synthetic:heldout", "--k", "4", "--out", str(tmp_path / "eval")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "synthetic:heldout.json").read_text())
    assert result["problems"] == end["problems"]
    assert result["avg_at_k"] >= blind + 0.4 and abs(result["avg_at_k"] - end["avg_at_k"]) < 0.15, result["avg_at_k"]


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_first_mini_batch_ratio_is_exactly_one(arith_model, tmp_path, tp):
    """The old log-probs come from a forward with the training forward's micro-batch shapes: with one
    mini-batch per step every ratio is exactly 1, not 1 up to kernel noise (several micro-batches per step).
    TP=1 also trains the per-token similarity's linear predictor (an extension): it starts at the identity,
    and at the policy's rate of the 7B example (1e-7) its weights could move by 1e-6 at most in these updates; at
    popo.per_token.predictor_lr (1e-4) it really moves. TP=2 packs its sequences into micro-batches of 32
    tokens: the old log-probs' pass and the update's see the same packs."""
    out = tmp_path / f"ratio_tp{tp}"
    overrides = ["train.steps=4", "train.mini_batches=1", "train.micro_batch_size=2", "optim.lr_warmup_steps=0"]
    # The bounded ratio (an extension: the paper has none) against the trainer's pi_old (the main job takes
    # the engine's).
    overrides += ["popo.is_bound.mode=clip", "loss.old_logprobs=trainer"]
    if tp == 1:
        overrides += ["popo.similarity=per_token", "popo.per_token.predictor=linear", "train.checkpoint_every=4"]
    else:
        overrides += ["train.checkpoint_every=0", "train.max_tokens_per_microbatch=32"]
    _finish(
        _popo_train(out, arith_model, f"parallel.tensor_model_parallel_size={tp}", *overrides, *SMALL[:2], *EASY), out
    )
    measured = [r for r in records(out) if math.isfinite(r["ratio_max"])]
    assert measured, "no step had a positive"
    for r in measured:
        assert r["ratio_max"] == 1.0 and r["all"]["popo/ratio_min"] == 1.0, r["step"]
        assert r["clip_frac"] == 0.0
    if tp == 1:
        weight = checkpoint_tensors(out / "checkpoints" / "step_000004")["predictor.linear.weight"]
        change = (weight - torch.eye(weight.shape[0])).abs().max().item()
        updates = sum(r["all"].get("train/skipped_updates", 0) == 0 for r in records(out))
        assert updates >= 2 and change > 2e-5, f"after {updates} updates the predictor moved by {change} at most"


def _one_kv_head_model(path: Path) -> Path:
    """The main job's tiny model with one KV head: at TP=2 it is replicated (two query groups), at TP=1 not."""
    from popo_megatron.data.synthetic import ARITHMETIC_QWEN2, arithmetic_tokenizer
    from popo_megatron.model.random_model import save_random_hf_model

    save_random_hf_model(path, "Qwen2Config", 1234, **{**ARITHMETIC_QWEN2, "num_key_value_heads": 1})
    arithmetic_tokenizer().save_pretrained(path)
    return path


def _reshard(ckpt: Path, out: Path, tp: int) -> None:
    command = [sys.executable, "-m", "popo_megatron", "convert", "mcore-reshard", "--ckpt", str(ckpt)]
    proc = subprocess.run([*command, "--out", str(out), "--tp", str(tp), "--pp", "1", "--quiet"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def test_resume_at_another_layout_across_a_kv_head_replication_change(tmp_path):
    """TP=2 -> TP=1 with one KV head changes the query groups: `popo convert mcore-reshard` rewrites the
    training checkpoint (weights, EMA target, optimiser moments, head), and a run at PP=2 (another layout
    again, which Megatron loads directly) continues from it with the rollouts and losses of the run that
    never moved. The rewrite is exact: back at TP=2 every stored tensor equals the original (the replicated
    heads rebuilt from one copy). (A direct load across the change refuses, naming mcore-reshard:
    tests/test_convert.py.)"""
    from popo_megatron.convert.offline import mcore_reshard

    model = _one_kv_head_model(tmp_path / "mqa")
    reference = tmp_path / "tp2"
    # Step 2 of this seed has positives (step 3 has none): the resumed step trains.
    tp2 = ["parallel.tensor_model_parallel_size=2", "train.checkpoint_every=1", "train.keep_last=2", *SMALL]
    _finish(_popo_train(reference, model, "train.steps=2", *tp2), reference)
    saved = reference / "checkpoints" / "step_000001"

    resharded = tmp_path / "tp1_ckpt"
    _reshard(saved, resharded, tp=1)
    assert json.loads((resharded / "popo_checkpoint.json").read_text())["query_groups"] == 1
    mcore_reshard(resharded, tmp_path / "back_at_tp2", tp=2, pp=1, progress=False)
    original, back = checkpoint_tensors(saved), checkpoint_tensors(tmp_path / "back_at_tp2")
    assert sorted(back) == sorted(original) and any(k.startswith("optimizer.state.exp_avg.") for k in back)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key

    moved = tmp_path / "moved"
    pp2 = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]
    _finish(
        _popo_train(
            moved, model, f"train.resume_from={resharded}", *pp2, "train.checkpoint_every=0", "train.steps=2", *SMALL
        ),
        moved,
    )
    assert [r["step"] for r in records(moved)] == [2], "the new run starts where the checkpoint stopped"
    expected, resumed = records(reference)[1], records(moved)[0]
    assert resumed["reward_mean"] == expected["reward_mean"], "the same rollouts"
    assert math.isfinite(expected["loss"]), "the compared step trained"
    for key in ("loss", "pos_loss", "nll", "sim_loss", "ent_loss", "drift", "entropy"):
        if math.isfinite(expected[key]):
            assert resumed[key] == pytest.approx(expected[key], abs=1e-4), key


def _popo_train_now(out: Path, model: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`popo train` on the tiny example, to completion, its console captured (later overrides win)."""
    command = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"model.hf_path={model}"]
    command += [f"train.output_dir={out}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_resume_says_what_changed_and_refuses_what_it_cannot_continue(arith_model, tmp_path):
    out = tmp_path / "run"
    base = ["train.checkpoint_every=0", "optim.lr_decay_style=constant", "optim.lr_warmup_steps=0", *SMALL]
    _finish(_popo_train(out, arith_model, "train.steps=1", *base), out)

    again = _popo_train_now(out, arith_model, *base, "train.steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is a complete run (1/1 steps): nothing to train" in again.stdout and "train.steps=2" in again.stdout
    assert "mean reward" not in again.stdout + again.stderr, "the old summary, as if the command had trained"

    changed = _popo_train_now(out, arith_model, *base, "train.steps=1", "rollout.temperature=0.8")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr + changed.stdout
    assert "rollout.temperature: 1.0 -> 0.8" in changed.stderr and "would apply to no step" in changed.stderr

    refused = _popo_train_now(out, arith_model, *base, "train.steps=2", "rollout.n=8")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr + refused.stdout
    assert "rollout.n: 4 -> 8" in refused.stderr and "train.output_dir" in refused.stderr
    assert len(records(out)) == 1, "a refused resume trains nothing"

    resumed = _popo_train_now(out, arith_model, *base, "train.steps=2", "optim.lr=5e-4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    console = resumed.stdout + resumed.stderr
    assert "changed: optim.lr: 0.001 -> 0.0005" in console and "changed: train.steps: 1 -> 2" in console
    assert [r["step"] for r in records(out)] == [1, 2]
    # The new rate is the one used (Megatron's scheduler would keep the checkpoint's 1e-3 by default).
    assert [r["lr"] for r in records(out)] == [pytest.approx(1e-3), pytest.approx(5e-4)]


def _crash_worker(model: str, out: str) -> None:
    from megatron.core import dist_checkpointing

    from popo_megatron.checkpoint.format import CheckpointError
    from popo_megatron.config import load_config
    from popo_megatron.trainer.loop import StopRequest, save_or_record_stop
    from popo_megatron.trainer.recipe import Recipe

    cfg = load_config(EXAMPLE, [f"model.hf_path={model}", f"train.output_dir={out}", *SMALL])
    state = Recipe(cfg).setup()
    try:
        state.train_step(0)
        state.step = 1
        state.save()
        state.train_step(1)
        state.step = 2

        def crash(*args, **kwargs):  # the file system fails (or the job is killed) in the middle of the write
            raise OSError("disk full")

        real_save, dist_checkpointing.save = dist_checkpointing.save, crash
        try:
            # while stopping for a signal: the save's failure in one line, and run_state.json still written
            with pytest.raises(CheckpointError, match=r"step_000002 failed \(OSError: disk full"):
                save_or_record_stop(state, StopRequest(None, None), "signal", rank0=True)
        finally:
            dist_checkpointing.save = real_save
    finally:
        state.close()


def test_crash_while_checkpointing_keeps_the_previous_latest(arith_model, tmp_path):
    from popo_megatron.checkpoint.runs import latest_checkpoint

    out = tmp_path / "crash"
    run_local(_crash_worker, 1, str(arith_model), str(out))
    assert latest_checkpoint(out).name == "step_000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"], "nothing partial"
    # The job script requeues it, to resume from the checkpoint that is there.
    state = json.loads((out / "run_state.json").read_text())
    assert state == {"step": 1, "steps": state["steps"], "complete": False, "stopped_by": "signal"}


def test_stops_with_a_checkpoint_before_the_wall_time_limit(arith_model, tmp_path):
    out = tmp_path / "limited"
    # Start-up alone takes longer than a second: the first step is the last one that fits.
    _finish(_popo_train(out, arith_model, "train.steps=5", "train.max_wall_time_s=1", *SMALL), out)
    assert json.loads((out / "run_state.json").read_text()) == {
        "step": 1,
        "steps": 5,
        "complete": False,
        "stopped_by": "time",
    }
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000001"
