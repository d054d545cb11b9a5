"""Faults the trainer survives without applying or saving anything broken (the real trainer on the tiny
model, two data-parallel ranks on CPU):

- a NaN in one micro-batch of one rank: every rank refuses the update (weights, Adam moments, the EMA
  target, the predictor and the LR schedule stay bit-identical), counts it, and trains on afterwards;
- train.max_nonfinite_steps refused updates in a row stop the run with one line naming the last checkpoint;
- weights that are not finite are never saved: the save refuses and `latest` stays where it was;
- a rollback (train.resume_from an earlier checkpoint of the same directory) sets the later history aside
  instead of colliding with it, and `keep_last` then prunes by step without touching what `latest` names;
- a second job on the same directory refuses at once, naming the first;
- a run stopped by SIGTERM, or killed with SIGKILL at random moments, resumes bit-identical to one that
  never stopped;
- a disk that fills while a checkpoint is written: the run stops with one line, nothing of the failed save
  is left, `latest` names the previous checkpoint, and the same command resumes from it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from run_helpers import EXAMPLE, SMALL, assert_same_run, checkpoint_tensors

from popo_megatron.launch import run_local


def _snapshot(state) -> dict[str, torch.Tensor]:
    """Everything an optimiser step changes on this rank, copied."""
    tensors = {f"model.{n}": p.detach().clone() for n, p in state.model.named_parameters()}
    for i, part in enumerate(getattr(state.optimizer, "chained_optimizers", [state.optimizer])):
        for j, per_param in enumerate(part.optimizer.state.values()):
            for key, value in per_param.items():
                tensors[f"adam{i}.{j}.{key}"] = torch.as_tensor(value).clone()
    objective = state.objective
    tensors |= {f"target.{i}": t.clone() for i, t in enumerate(objective.target.local_tensors())}
    if objective.head is not None:
        tensors |= {f"head.{n}": p.detach().clone() for n, p in objective.head.named_parameters()}
    tensors["lr"] = torch.tensor(state.optimizer.param_groups[0]["lr"])
    return tensors


def _nonfinite_worker(model: str, out: str) -> None:
    import torch.distributed as dist

    from popo_megatron.checkpoint.format import CheckpointError
    from popo_megatron.checkpoint.runs import latest_checkpoint
    from popo_megatron.config import load_config
    from popo_megatron.errors import UserError
    from popo_megatron.trainer.recipe import Recipe

    overrides = [f"model.hf_path={model}", f"train.output_dir={out}", "train.max_nonfinite_steps=3", *SMALL]
    cfg = load_config(EXAMPLE, overrides)
    state = Recipe(cfg).setup()
    poisoned = False
    real_loss = state.objective.loss

    def loss(index, mb, *rest):  # a NaN in micro-batch 0 of rank 1's share, while `poisoned`
        value = real_loss(index, mb, *rest)
        return value * float("nan") if poisoned and dist.get_rank() == 1 and index == 0 else value

    state.objective.loss = loss
    minis = cfg.train.mini_batches
    try:
        state.train_step(0)
        state.step = 1
        state.save()

        before = _snapshot(state)
        poisoned = True
        record = state.train_step(1)
        refused, skipped = record["nonfinite_steps"], record["all"].get("train/skipped_updates", 0)
        assert refused >= 1 and refused + skipped == minis, record["all"]
        assert math.isnan(record["grad_norm"])
        after = _snapshot(state)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"a refused update changed {changed[:5]}"

        poisoned = False
        step = 2
        while True:  # on until an update is applied (a step without a positive has nothing to update)
            record = state.train_step(step)
            step += 1
            assert record["nonfinite_steps"] == 0 and step < 10, record["all"]
            if record["all"].get("train/skipped_updates", 0) < minis:
                break
        assert state.nonfinite_in_a_row == 0
        assert any(not torch.equal(before[k], v) for k, v in _snapshot(state).items() if k.startswith("model."))
        state.step = step
        state.save()
        last = f"step_{step:06d}"

        poisoned = True
        with pytest.raises(UserError, match=rf"training diverged: 3 updates in a row .* Last checkpoint: .*{last}"):
            for later in range(step, step + 10):
                state.train_step(later)

        with torch.no_grad():
            if dist.get_rank() == 0:  # one rank's weights: every rank refuses the save
                next(state.model.parameters()).view(-1)[0] = float("inf")
        state.step = step + 1
        with pytest.raises(CheckpointError, match=r"not saving .*: 1 weight tensor\(s\) hold NaN or inf"):
            state.save()
        assert latest_checkpoint(out).name == last
    finally:
        state.close()


def test_a_nan_in_one_micro_batch_is_refused_everywhere_and_never_saved(arith_model, tmp_path):
    out = tmp_path / "run"
    run_local(_nonfinite_worker, 2, str(arith_model), str(out))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) == 3 and kept[:2] == ["latest", "step_000001"], f"nothing from the refused save: {kept}"
    for name in kept[1:]:
        tensors = checkpoint_tensors(out / "checkpoints" / name)
        bad = [k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
        assert not bad, f"{name} holds non-finite {bad[:5]}"


def _popo_train(out, model, *overrides: str) -> str:
    command = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"model.hf_path={model}"]
    command += [f"train.output_dir={out}", "eval.data=null", *SMALL, *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    return console


def test_a_rollback_sets_the_later_history_aside_and_keep_last_prunes_by_step(arith_model, tmp_path):
    from popo_megatron.checkpoint.runs import latest_checkpoint, run_checkpoints

    out = tmp_path / "run"
    root = out / "checkpoints"
    every = ["train.checkpoint_every=1", "train.keep_last=2"]
    _popo_train(out, arith_model, "train.steps=3", *every)
    assert [p.name for p in run_checkpoints(root)] == ["step_000002", "step_000003"]

    console = _popo_train(out, arith_model, "train.steps=4", f"train.resume_from={root / 'step_000002'}", *every)
    assert "step_000003 moved to" in console and "superseded" in console, console[-3000:]
    assert [p.name for p in run_checkpoints(root)] == ["step_000003", "step_000004"]
    assert latest_checkpoint(out).name == "step_000004"
    (aside,) = (root / "superseded").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["step_000003"], "the old history is kept, not deleted"


def test_a_second_job_on_the_same_directory_refuses_at_once_naming_the_first(arith_model, tmp_path):
    import socket
    import time

    from popo_megatron.checkpoint.runs import latest_checkpoint
    from popo_megatron.trainer.run_lock import LOCK_FILE

    out = tmp_path / "run"
    command = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"model.hf_path={arith_model}"]
    command += [f"train.output_dir={out}", "eval.data=null", *SMALL, "train.checkpoint_every=5"]
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen([*command, "train.steps=40"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        start = time.monotonic()
        second = subprocess.run([*command, "train.steps=40"], capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
        console = second.stdout + second.stderr
        assert second.returncode == 2 and "Traceback" not in console, console[-3000:]
        assert f"is in use by another run (host {socket.gethostname()} PID" in console, console[-3000:]
        assert seconds < 60, f"the second job took {seconds:.0f} s to refuse"
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert latest_checkpoint(out).name == "step_000040", "the first run finished untouched"
    assert not (out / LOCK_FILE).exists(), "released at the end"


@contextmanager
def _small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB mounted at `path`: a disk that really fills (ENOSPC)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs mount (root with CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_that_fills_while_saving_leaves_the_previous_checkpoint_latest(arith_model, tmp_path):
    from popo_megatron.checkpoint.runs import latest_checkpoint, run_checkpoints

    # A checkpoint of the tiny model is about 8 MiB: the disk holds the first, not the second beside it.
    # (The run starts fresh, saving every step: step 1 is saved, step 2's save fills the disk.)
    with _small_disk(tmp_path / "disk", 14) as disk:
        out = disk / "run"
        root = out / "checkpoints"
        command = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"model.hf_path={arith_model}"]
        command += [f"train.output_dir={out}", "eval.data=null", *SMALL, "train.checkpoint_every=1", "train.steps=2"]
        full = subprocess.run(command, capture_output=True, text=True, timeout=600)
        console = full.stdout + full.stderr
        assert full.returncode != 0, console[-3000:]
        assert f"saving {root / 'step_000002'} failed" in console, console[-3000:]
        assert "MiB free there" in console and "Traceback" not in console, console[-3000:]
        assert f"the last checkpoint is still {root / 'step_000001'}" in console
        assert latest_checkpoint(out).name == "step_000001"
        assert [p.name for p in run_checkpoints(root)] == ["step_000001"]
        assert not list(root.glob(".*")), "nothing of the failed save is left"
        # With space again the same command resumes from step 1 and saves step 2.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        console = _popo_train(out, arith_model, "train.steps=2", "train.checkpoint_every=1")
        assert "at step 1/2" in console, console[-3000:]
        assert latest_checkpoint(out).name == "step_000002"


def _sigterm_the_ranks_in_their_set_up(process: subprocess.Popen, out: Path) -> None:
    """Send SIGTERM to the training rank(s), as Slurm would, once they have taken the run's lock (their stop
    handler is installed by then) and before they log a step. A step of the tiny model takes 0.1 s, so a
    signal aimed at a step lands anywhere later on a loaded machine; the set-up (vLLM's engine) takes
    seconds: the ranks then finish step 1 and stop, every time."""
    import signal
    import time

    import psutil

    from popo_megatron.trainer.run_lock import LOCK_FILE

    deadline = time.monotonic() + 300
    while not (out / LOCK_FILE).exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    assert not (out / "metrics.jsonl").exists(), "a step ended before the signal could be sent"
    for rank in psutil.Process(process.pid).children():
        rank.send_signal(signal.SIGTERM)


def test_stopped_or_killed_at_random_moments_a_run_resumes_as_the_uninterrupted_one(arith_model, tmp_path):
    """Against one run that never stopped (6 steps):
    - SIGTERM in the ranks' set-up (no periodic checkpoints): they finish step 1, save it, record
      run_state.json (stopped by a signal), and the same command resumes from it;
    - SIGKILL of the whole job (its launcher, ranks, engine and grading processes) at seeded random moments
      (once in the start-up, then within a random step or the save after it, then just after a checkpoint),
      checkpoints every step, started again each time.
    Both end complete with the metrics and the bit-identical weights, Adam state and EMA target of the
    uninterrupted run."""
    import json
    import os
    import random
    import signal
    import time

    from popo_megatron.checkpoint.format import read_checkpoint
    from popo_megatron.checkpoint.runs import latest_checkpoint, step_of

    steps = ["train.steps=6", "train.keep_last=2"]
    straight = tmp_path / "straight"
    _popo_train(straight, arith_model, *steps, "train.checkpoint_every=0")
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def command(out: Path, every: int) -> list[str]:
        head = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"model.hf_path={arith_model}"]
        return [*head, f"train.output_dir={out}", "eval.data=null", *SMALL, *steps, f"train.checkpoint_every={every}"]

    stopped = tmp_path / "stopped"
    with open(tmp_path / "stopped.log", "wb") as log:
        process = subprocess.Popen(command(stopped, 0), stdout=log, stderr=subprocess.STDOUT, env=env)
    _sigterm_the_ranks_in_their_set_up(process, stopped)
    assert process.wait(timeout=600) == 0, (tmp_path / "stopped.log").read_text()[-3000:]
    state = json.loads((stopped / "run_state.json").read_text())
    assert state == {"step": 1, "steps": 6, "complete": False, "stopped_by": "signal"}, state
    assert latest_checkpoint(stopped).name == "step_000001", "the step it was in was finished and saved"
    _popo_train(stopped, arith_model, *steps, "train.checkpoint_every=0")
    assert_same_run(straight, stopped, step=6)

    killed = tmp_path / "killed"
    rng = random.Random(20261207)
    kills: list[str] = []

    def complete() -> bool:
        state = killed / "run_state.json"
        return state.is_file() and json.loads(state.read_text())["complete"]

    while not complete():
        assert len(kills) < 6, f"the run never completed: {kills}"
        log = tmp_path / f"start_{len(kills) + 1}.log"
        latest = latest_checkpoint(killed)
        done = 0 if latest is None else step_of(latest)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command(killed, 1), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        try:
            if not kills:  # in the start-up
                moment = rng.uniform(1, 6)
                process.wait(timeout=moment)
            elif len(kills) == 1 and done < 5:  # within a step's save, or the step after it
                step, delay = rng.randint(done + 1, 5), rng.uniform(0, 1.5)
                moment = f"{delay:.2f} s after step {step}"
                while f"step {step}/6 |" not in log.read_text(errors="replace") and process.poll() is None:
                    time.sleep(0.02)
                process.wait(timeout=delay)
            elif len(kills) == 2 and done < 5:  # once a new checkpoint is complete: the next start resumes
                delay = rng.uniform(0, 1.0)
                moment = f"{delay:.2f} s after a checkpoint past step {done}"
                while (step_of(latest_checkpoint(killed) or killed) or 0) <= done and process.poll() is None:
                    time.sleep(0.02)
                process.wait(timeout=delay)
            else:
                moment = "none"
                process.wait(timeout=600)
            assert process.returncode == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills.append(str(moment))
            latest = latest_checkpoint(killed)
            if latest is not None:  # whatever the moment was, latest names a complete checkpoint
                read_checkpoint(latest)
    assert len(kills) >= 2, kills
    resumed = [p.name for p in sorted(tmp_path.glob("start_*.log")) if "resumed from" in p.read_text()]
    assert resumed, f"no start resumed from a checkpoint: {kills}"
    assert_same_run(straight, killed, step=6)
