"""The POPO (or GRPO) training loop. Every rank runs this function.

prompts -> rollout (vLLM, n per prompt) -> reward (math-verify pool) -> positives and weights
        -> old log-probs (trainer forward, optional) -> per mini-batch: twin forward (hidden states)
        -> loss, backward, optimiser step -> twin EMA and momentum -> weight sync to vLLM
        -> metrics -> checkpoint on schedule or on signal
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.algo.advantages import group_stats
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.metrics import MetricAccumulator
from popo_megatron.algo.predictor import clip_with_predictor
from popo_megatron.algo.step import LossSettings, Normalizers, forward_backward, forward_only, loss_normalizers
from popo_megatron.config.schema import Algorithm, OldLogprobs
from popo_megatron.platform import init_distributed
from popo_megatron.reward.grade import add_grade_metrics
from popo_megatron.trainer.batching import rank_rows, step_batch
from popo_megatron.trainer.heldout import HeldoutEvaluator
from popo_megatron.trainer.logbook import Logbook, clear_run_state, step_record, write_run_state
from popo_megatron.trainer.rollouts import collect_step
from popo_megatron.trainer.state import TrainState, build_train_state

# Metrics only the last pipeline stage measures (where the loss is computed).
_LOSS_SIDE = ("loss/", "popo/", "grpo/", "entropy", "rollout/", "train/")
# Seeds of a step's rollouts: step_seed = seed + STEP_SEED_STRIDE * step, prompt j uses step_seed + j.
STEP_SEED_STRIDE = 1_000_003


@dataclass
class RunSummary:
    steps: int
    first_reward: float
    last_reward: float
    output_dir: Path
    stopped_by: str | None = None  # "signal" or "time" when the run stopped before train.steps


class _StopRequest:
    """When to stop early, with a checkpoint, at the end of a step: SIGTERM / SIGUSR1 (a scheduler's warning
    before preemption or the end of the job), or the next step would end after train.max_wall_time_s."""

    def __init__(self, max_wall_time_s: float | None) -> None:
        self.signalled = False
        self.start = time.monotonic()
        self.max_wall_time_s = max_wall_time_s
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self, step_s: float) -> str | None:
        """Why every rank stops now ("signal", "time") or None (collective: ranks may see a signal at
        different times). A next step is assumed to take up to twice the last one, its checkpoint included."""
        out_of_time = self.max_wall_time_s is not None and (
            time.monotonic() - self.start + 2 * step_s > self.max_wall_time_s
        )
        flags = torch.tensor([float(self.signalled), float(out_of_time)])
        if dist.is_initialized():
            from popo_megatron.platform import collective_device

            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, out_of_time = flags.tolist()
        return "signal" if signalled else "time" if out_of_time else None


def _micro_batches(mini: PolicyBatch, cfg: DictConfig) -> list[PolicyBatch]:
    """The micro-batches of a mini-batch, for every forward of it: the old log-probs, the twin, the update.
    The same shapes everywhere, so that on-policy ratios are exactly 1, not 1 up to kernel noise."""
    return mini.micro_batches(mini.size // cfg.train.micro_batch_size)


def _forward_logprobs(state: TrainState, minis: list[PolicyBatch], settings: LossSettings) -> torch.Tensor | None:
    micro = [mb for mini in minis for mb in _micro_batches(mini, state.cfg)]
    outputs = forward_only(state.ddp, micro, settings)
    return torch.cat([o.logprobs.cpu() for o in outputs]) if outputs else None


def _update(
    state: TrainState,
    mini: PolicyBatch,
    settings: LossSettings,
    normalizers: Normalizers,
    twin_hidden: list[torch.Tensor] | None,
) -> tuple[MetricAccumulator, float]:
    """Loss, backward and one optimiser step on a mini-batch (and the predictor's, clipped together with
    the policy's gradients); returns this rank's loss metrics and the gradient norm before clipping."""
    state.ddp.zero_grad_buffer()
    state.optimizer.zero_grad()
    metrics = forward_backward(
        state.ddp, _micro_batches(mini, state.cfg), settings, normalizers, twin_hidden, state.predictor
    )
    joint_norm = None
    if state.uses_predictor:
        if state.predictor is not None:
            state.predictor.finish_grad_sync()
        joint_norm = clip_with_predictor(state.optimizer, state.ddp, state.predictor, state.cfg.optim.clip_grad)
        if state.predictor is not None:
            state.predictor_optimizer.step()
            state.predictor_optimizer.zero_grad()
    _, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(1)
    state.follow_lr_schedule()
    return metrics, joint_norm if joint_norm is not None else grad_norm


def _from_last_stage(value):
    """`value` as the last pipeline stage has it (the loss and its metrics live there), on every stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    holder = [value]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]


def _reduce_metrics(metrics: MetricAccumulator) -> dict[str, float]:
    """Reduced over data-parallel ranks; the loss metrics from the last stage, the rollout ones are everywhere."""
    from megatron.core import parallel_state

    reduced = metrics.reduce(parallel_state.get_data_parallel_group())
    return {**_from_last_stage(reduced), **{k: v for k, v in reduced.items() if not k.startswith(_LOSS_SIDE)}}


def train_step(state: TrainState, step: int) -> dict:
    """One rollout step and its updates; returns the metrics.jsonl record (on every rank)."""
    from megatron.core import parallel_state

    cfg = state.cfg
    step_start = time.perf_counter()
    settings = state.settings
    state.engine.wake()
    rollouts = collect_step(
        state.engine,
        state.verifier,
        state.tokenizer,
        lambda count: [state.problems[i] for i in state.sampler.next_indices(count)],
        cfg,
        cfg.seed + STEP_SEED_STRIDE * step,
    )
    rollout_times, groups, generated = rollouts.times, rollouts.trained, rollouts.generated
    state.engine.sleep()
    metrics = MetricAccumulator()  # the rollout metrics describe every group sampled in the step
    add_grade_metrics([g for group in generated for g in group.grades], metrics)
    group_stats(torch.tensor([g.rewards for g in generated])).add_to(metrics)
    lengths = [len(r.token_ids) for g in generated for r in g.responses]
    metrics.add_mean("response/length", sum(lengths), len(lengths))
    metrics.add_mean("response/truncated", sum(r.truncated for g in generated for r in g.responses), len(lengths))
    metrics.add_mean("data/rounds", rollouts.rounds, 1)
    metrics.add_mean("data/groups_trained", len(groups), 1)

    train_start = time.perf_counter()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    # No group with a signal (dynamic sampling gave up): the generated ones, which teach nothing, keep the
    # schedule (POPO: no positive, nothing trains; GRPO: zero advantages).
    step_rows = step_batch(groups or generated, cfg, state.pad_id)
    # POPO's all_tokens normaliser: every rollout's response tokens (negatives too), a share per mini-batch.
    all_tokens = float(step_rows.response_lengths().sum()) / cfg.train.mini_batches
    batch = rank_rows(step_rows, cfg, dp, dp_rank)
    minis = batch.micro_batches(cfg.train.mini_batches)  # equal consecutive slices: the mini-batches
    old_start = time.perf_counter()
    if cfg.popo.old_logprobs == OldLogprobs.trainer or settings.tis_cap is not None:
        batch = batch.with_fields(old_logprobs=_forward_logprobs(state, minis, settings))
    else:
        batch = batch.with_fields(old_logprobs=batch.rollout_logprobs)
    if state.reference is not None:
        with state.reference.swapped_in():
            batch = batch.with_fields(ref_logprobs=_forward_logprobs(state, minis, settings))
    minis = batch.micro_batches(cfg.train.mini_batches)
    old_s = time.perf_counter() - old_start
    twin_s = 0.0
    grad_norm = float("nan")
    for mini in minis:
        # beta as the adaptive controller (if on) has it now
        current = replace(settings, similarity_beta=state.beta.value) if state.twin is not None else settings
        normalizers = loss_normalizers(mini, current, all_tokens)
        twin_hidden = None
        if current.uses_twin_hidden:
            twin_start = time.perf_counter()
            with state.twin.swapped_in():
                outputs = forward_only(state.ddp, _micro_batches(mini, cfg), current, hidden=True, logprobs=False)
            twin_hidden = [o.hidden for o in outputs]
            twin_s += time.perf_counter() - twin_start
        drift = None
        if normalizers.policy > 0 or normalizers.similarity > 0:
            step_metrics, grad_norm = _update(state, mini, current, normalizers, twin_hidden)
            reduced = step_metrics.reduce(parallel_state.get_data_parallel_group())
            drift = reduced.get("popo/similarity")
            metrics.merge(step_metrics)
        else:  # nothing to learn from: no gradient, and no Adam step that would move the weights anyway
            metrics.add_total("train/skipped_updates", 1)
        if state.twin is not None:
            drift = _from_last_stage(drift)
            state.twin.update(state.momentum.value)
            state.momentum.advance(drift)
            state.beta.advance(drift)
    train_s = time.perf_counter() - train_start

    sync_start = time.perf_counter()
    state.sync_weights()
    sync_s = time.perf_counter() - sync_start
    reduced = _reduce_metrics(metrics)
    step_s = time.perf_counter() - step_start
    extra = {
        "twin_momentum": state.momentum.value if state.twin is not None else float("nan"),
        "similarity_beta": state.beta.value if state.twin is not None else float("nan"),
        "lr": state.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "response_len_mean": reduced.get("response/length", float("nan")),
        "time_rollout_s": rollout_times.generate_s,
        "time_reward_s": rollout_times.grade_s,
        "time_train_s": train_s,  # everything below, and the updates
        "time_old_logprobs_s": old_s,
        "time_twin_forward_s": twin_s,
        "time_sync_s": sync_s,
        "time_step_s": step_s,
        "tokens_per_s": rollout_times.generated_tokens / step_s,
    }
    return step_record(step + 1, reduced, extra, grpo=Algorithm(cfg.algorithm) == Algorithm.grpo)


def train(cfg: DictConfig) -> RunSummary:
    """Run (or resume) the configured training on this rank; collective over the world."""
    stop = _StopRequest(cfg.train.max_wall_time_s)
    rank0 = init_distributed().rank == 0
    if rank0:  # before anything can fail: a job script must not requeue a run that crashed
        clear_run_state(Path(cfg.train.output_dir))
    heldout = HeldoutEvaluator(cfg) if cfg.eval.data else None  # its data loads (or fails) before the engine starts
    state = build_train_state(cfg)
    logbook = Logbook(cfg.train.output_dir, cfg.train.steps, state.step, enabled=rank0)
    rewards = []
    stopped_by = None
    try:
        if heldout is not None and state.step == 0:
            logbook.record_heldout(heldout.evaluate(state.engine, state.verifier, state.tokenizer, 0))
        for step in range(state.step, cfg.train.steps):
            record = train_step(state, step)
            state.step = step + 1
            rewards.append(record["reward_mean"])
            logbook.record(record)
            stopped_by = stop.agreed(record["time_step_s"]) if state.step < cfg.train.steps else None
            if heldout is not None and not stopped_by and heldout.due(state.step):
                logbook.record_heldout(heldout.evaluate(state.engine, state.verifier, state.tokenizer, state.step))
            every = cfg.train.checkpoint_every
            if stopped_by or state.step == cfg.train.steps or (every and state.step % every == 0):
                state.save_checkpoint()
            if stopped_by:
                break
    finally:
        logbook.close()
        state.close()
    summary = RunSummary(
        steps=state.step,
        first_reward=rewards[0] if rewards else float("nan"),
        last_reward=rewards[-1] if rewards else float("nan"),
        output_dir=Path(cfg.train.output_dir),
        stopped_by=stopped_by,
    )
    if rank0:
        write_run_state(summary.output_dir, state.step, cfg.train.steps, stopped_by)
    return summary
