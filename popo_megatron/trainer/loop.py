"""The training run: the recipe's steps (trainer/recipe.py) from the resumed step to train.steps, with the
held-out evaluations, the logbook, checkpoints on schedule, and an early stop (with a checkpoint) on a
scheduler's signal or before train.max_wall_time_s. Every rank runs `train`."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.errors import UserError
from popo_megatron.platform import init_distributed
from popo_megatron.trainer.heldout import HeldoutEvaluator
from popo_megatron.trainer.logbook import Logbook, clear_run_state, write_run_state
from popo_megatron.trainer.recipe import Recipe
from popo_megatron.trainer.run_lock import RunLock


@dataclass
class RunSummary:
    steps: int
    first_reward: float
    last_reward: float
    output_dir: Path
    stopped_by: str | None = None  # "signal" or "time" when the run stopped before train.steps


class StopRequest:
    """When to stop early, with a checkpoint, at the end of a step: SIGTERM / SIGUSR1 (a scheduler's warning
    before preemption or the end of the job), or the next step and the checkpoint after it would end after
    train.max_wall_time_s; and when a checkpoint is due by time (train.checkpoint_every_minutes)."""

    def __init__(self, max_wall_time_s: float | None, checkpoint_every_minutes: float | None) -> None:
        self.signalled = False
        self.start = time.monotonic()
        self.last_save = self.start
        self.max_wall_time_s = max_wall_time_s
        self.save_interval_s = None if checkpoint_every_minutes is None else 60.0 * checkpoint_every_minutes
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self, step_s: float, save_s: float) -> tuple[str | None, bool]:
        """(why every rank stops now: "signal", "time" or None; whether a checkpoint is due by time).
        Collective: ranks may see a signal at different times, and measure their own times. A next step is
        assumed to take up to twice the last one, and its checkpoint `save_s` (the last save's time, or an
        estimate before the first)."""
        now = time.monotonic()
        out_of_time = self.max_wall_time_s is not None and (
            now - self.start + 2 * step_s + save_s > self.max_wall_time_s
        )
        save_due = self.save_interval_s is not None and now - self.last_save >= self.save_interval_s
        flags = torch.tensor([float(self.signalled), float(out_of_time), float(save_due)])
        if dist.is_initialized():
            from popo_megatron.platform import collective_device

            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, out_of_time, save_due = flags.tolist()
        return ("signal" if signalled else "time" if out_of_time else None), bool(save_due)


def train(cfg: DictConfig) -> RunSummary:
    """Run (or resume) the configured training on this rank; collective over the world."""
    stop = StopRequest(cfg.train.max_wall_time_s, cfg.train.checkpoint_every_minutes)
    rank0 = init_distributed().rank == 0
    lock = _lock_run_directory(cfg.train.output_dir, rank0)  # collective; before anything touches the directory
    try:
        return _train(cfg, stop, rank0)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_directory(output_dir: str, rank0: bool) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same UserError when another run holds
    it (collective)."""
    lock, refused = None, [None]
    if rank0:
        try:
            lock = RunLock(output_dir)
            lock.acquire()
        except UserError as exc:
            lock, refused = None, [str(exc)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise UserError(refused[0])
    return lock


def _train(cfg: DictConfig, stop: StopRequest, rank0: bool) -> RunSummary:
    if rank0:  # before anything can fail: a job script must not requeue a run that crashed
        clear_run_state(Path(cfg.train.output_dir))
    heldout = HeldoutEvaluator(cfg) if cfg.eval.data else None  # its data loads (or fails) before the engine starts
    recipe = Recipe(cfg).setup()
    logbook = Logbook(cfg.train.output_dir, cfg.train.steps, recipe.step, rank0, recipe.objective.low_entropy_warning)
    rewards = []
    stopped_by = None
    save_s = recipe.estimated_save_s()
    try:
        if heldout is not None and recipe.step == 0:
            logbook.record_heldout(heldout.evaluate(recipe.engine, recipe.verifier, recipe.tokenizer, 0))
        for step in range(recipe.step, cfg.train.steps):
            record = recipe.train_step(step)
            recipe.step = step + 1
            rewards.append(record["reward_mean"])
            logbook.record(record)
            # collective: every rank stops (or saves) at the same step
            stopped_by, save_due = stop.agreed(record["time_step_s"], save_s)
            last = recipe.step == cfg.train.steps
            stopped_by = None if last else stopped_by
            if heldout is not None and not stopped_by and heldout.due(recipe.step):
                evaluation = heldout.evaluate(recipe.engine, recipe.verifier, recipe.tokenizer, recipe.step)
                logbook.record_heldout(evaluation)
            every = cfg.train.checkpoint_every
            if stopped_by or last or save_due or (every and recipe.step % every == 0):
                save_s = save_or_record_stop(recipe, stop, stopped_by, rank0)
            if stopped_by:
                break
    finally:
        logbook.close()
        recipe.close()
    summary = RunSummary(
        steps=recipe.step,
        first_reward=rewards[0] if rewards else float("nan"),
        last_reward=rewards[-1] if rewards else float("nan"),
        output_dir=Path(cfg.train.output_dir),
        stopped_by=stopped_by,
    )
    if rank0:
        write_run_state(summary.output_dir, recipe.step, cfg.train.steps, stopped_by)
    return summary


def save_or_record_stop(recipe: Recipe, stop: StopRequest, stopped_by: str | None, rank0: bool) -> float:
    """Checkpoint the run; returns the seconds it took. When the run is stopping and the save fails (the
    scheduler's kill came first, the disk is full), run_state.json still records the stop, so the job
    script requeues it to resume from the last complete checkpoint."""
    start = time.monotonic()
    try:
        recipe.save()
    except BaseException:
        if stopped_by and rank0:
            from popo_megatron.checkpoint.runs import latest_checkpoint, read_trainer_state

            last = latest_checkpoint(recipe.cfg.train.output_dir)
            step = 0 if last is None else int(read_trainer_state(last)["step"])
            write_run_state(Path(recipe.cfg.train.output_dir), step, recipe.cfg.train.steps, stopped_by)
        raise
    stop.last_save = time.monotonic()
    return stop.last_save - start
