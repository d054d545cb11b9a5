"""POPO (or GRPO) training on one rank, as a recipe: `setup` builds the run (or resumes it), a step is
`rollout` -> `update` -> `sync`, `save` writes a checkpoint, `close` stops the engine and the verifier.

    prompts -> rollout (vLLM, n per prompt) -> reward (math-verify pool) -> the objective's rows
            -> its forwards before the update (pi_old, weights, a reference) -> per mini-batch: its context
            (normalisers, an EMA target's features) -> loss, backward, optimiser step -> what follows it
            (an EMA) -> weight sync to vLLM -> metrics -> checkpoint on schedule or on signal (trainer/loop.py)

The objective (objectives/: POPO, GRPO) decides every algorithmic choice; the recipe never asks which.

Every rank runs every method, and every collective is named where it is called (`# collective:`): the ranks
of its group must all reach it, the same number of times.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from popo_megatron import metrics as m
from popo_megatron.algo.advantages import group_stats
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.predictor import build_head_optimizer, clip_with_head
from popo_megatron.algo.step import Forwards, LogprobSettings, forward_backward, from_last_stage
from popo_megatron.checkpoint.runs import latest_checkpoint, plan_resume, set_aside_later
from popo_megatron.checkpoint.training import Trained, load_training_checkpoint, save_training_checkpoint
from popo_megatron.config.schema import setting_value
from popo_megatron.data.problems import ProblemSet
from popo_megatron.data.prompts import check_packing_budget, drop_over_long, engine_context
from popo_megatron.data.sampler import PromptSampler
from popo_megatron.errors import UserError
from popo_megatron.logs import get_logger
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.objectives import MiniContext, Objective, ObjectiveContext, build_objective
from popo_megatron.platform import barrier
from popo_megatron.reward.grade import Verifier, add_grade_metrics
from popo_megatron.reward.restated import restates_problem
from popo_megatron.rollout.engine import RolloutEngine
from popo_megatron.rollout.seeds import step_seed
from popo_megatron.trainer.batching import rank_rows, step_batch
from popo_megatron.trainer.logbook import step_record
from popo_megatron.trainer.rollout_records import response_records, step_file, write_records
from popo_megatron.trainer.rollouts import StepRollouts, collect_step

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from transformers import PreTrainedTokenizerBase

log = get_logger("trainer")
# A conservative write rate per rank for the first checkpoint's time, before one is measured (a parallel file
# system under a whole job's writes; local disks are faster).
SAVE_BYTES_PER_S = 200e6


class Recipe:
    """A training run on this rank: the model and its optimiser, the objective (and what it keeps: a target,
    a head), the data, the verifier and the rollout engine, and the step they are at."""

    cfg: DictConfig
    args: HFModelArgs
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    objective: Objective
    head_optimizer: torch.optim.Optimizer | None  # the objective's head's, on the last pipeline stage
    forwards: Forwards
    problems: ProblemSet
    sampler: PromptSampler
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    verifier: Verifier
    engine: RolloutEngine

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self.nonfinite_in_a_row = 0  # updates refused for a non-finite gradient norm since the last applied one
        self._closed = False

    @property
    def model(self) -> torch.nn.Module:
        return self.ddp.module

    # --- setup ------------------------------------------------------------------------------------------
    def setup(self) -> Recipe:
        """Build everything for the config, then resume from OUTPUT_DIR (or train.resume_from) when asked."""
        from transformers import AutoTokenizer

        from popo_megatron.config.validate import validate_config
        from popo_megatron.data.datasets import literal_answers_by_default, load_dataset
        from popo_megatron.model.builder import build_gpt_model
        from popo_megatron.model.hf_config import read_hf_config
        from popo_megatron.model.training import build_optimizer, build_scheduler, wrap_ddp
        from popo_megatron.platform import init_distributed, init_model_parallel, seed_everything
        from popo_megatron.reward.math_verifier import MathVerifier
        from popo_megatron.rollout.vllm_engine import vllm_engine
        from popo_megatron.weights import load_hf_weights

        cfg = self.cfg
        world = init_distributed().world_size
        self.args = read_hf_config(cfg.model.hf_path)
        validate_config(cfg, world, self.args)
        init_model_parallel(cfg.parallel)
        seed_everything(cfg.seed)
        model = build_gpt_model(self.args, cfg)
        load_hf_weights(model, cfg.model.hf_path, self.args, cfg)
        self.ddp = wrap_ddp(model, self.args, cfg)
        self.optimizer = build_optimizer(self.ddp, cfg)
        total_updates = cfg.train.steps * cfg.train.mini_batches
        self.scheduler = build_scheduler(self.optimizer, cfg, total_updates)
        context = ObjectiveContext(
            loss=cfg.loss,
            optim=cfg.optim,
            vocab_size=self.args.vocab_size,
            hidden_size=self.args.hidden_size,
            temperature=cfg.rollout.temperature,
            seed=cfg.seed,
            total_updates=total_updates,
            group_size=cfg.rollout.n,
            mini_batches=cfg.train.mini_batches,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        self.objective = build_objective(cfg, context, self.ddp)
        head = self.objective.head
        self.head_optimizer = None if head is None else build_head_optimizer(head, self.objective.head_lr, cfg.optim)
        settings = LogprobSettings(self.args.vocab_size, cfg.rollout.temperature, cfg.loss.logprob_chunk_tokens)
        self.forwards = Forwards(self.ddp, settings, cfg.train.micro_batch_size, cfg.train.max_tokens_per_microbatch)
        self.problems = load_dataset(cfg.data)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        context = engine_context(cfg.rollout, self.args.max_position_embeddings)
        self.problems = drop_over_long(self.problems, self.tokenizer, cfg.data, context)
        if cfg.train.max_tokens_per_microbatch is not None:
            budget = cfg.train.max_tokens_per_microbatch
            check_packing_budget(self.problems, self.tokenizer, cfg.data, cfg.rollout.max_tokens, budget)
        self.sampler = PromptSampler(len(self.problems), cfg.data.shuffle_seed)
        self.verifier = MathVerifier(cfg.reward, literal_answers_by_default(cfg.data))
        self.engine = vllm_engine(cfg, cfg.model.hf_path)
        self._follow_lr_schedule()
        self._resume()
        return self

    def _resume(self) -> None:
        resume = plan_resume(self.cfg)
        if dist.get_rank() == 0:  # what was saved after the start belongs to another history: set aside
            start, checkpoint = (0, None) if resume is None else (resume.step, resume.checkpoint)
            moved = set_aside_later(self.cfg.train.output_dir, start, checkpoint)
            if moved is not None:
                names = ", ".join(sorted(p.name for p in moved.iterdir()))
                log.warning(
                    f"{self.cfg.train.output_dir} held checkpoints of another history of this run directory (after"
                    f" step {start}): {names} moved to {moved} (not deleted: remove it once you do not need it)"
                )
        barrier()
        if resume is None:
            return
        state = load_training_checkpoint(resume.checkpoint, self._trained(), self.args, self.cfg)  # collective
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.objective.load_state_dict(state["objective"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._follow_lr_schedule()
        self.sync()  # collective: the engine started from model.hf_path's weights
        if dist.get_rank() == 0:
            changed = "".join(f"\n  changed: {change}" for change in resume.changes)
            log.info(f"resumed from {resume.checkpoint} at step {self.step}/{self.cfg.train.steps}{changed}")

    # --- one step ---------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One rollout step and its updates; returns the metrics.jsonl record (on every rank)."""
        start = time.perf_counter()
        rollouts = self.rollout(step)
        # Every rank holds every group: the rollouts' metrics are whole here, and a reduction would count them
        # once per data-parallel rank.
        rollout_values = rollout_metrics(rollouts, self.objective).reduce(local=True)
        metrics = MetricAccumulator()
        counts = MetricAccumulator()  # what every rank decided alike: whole on each, not reduced
        counts.add_total(m.NONFINITE_STEPS, 0)  # a column of every step: 0 is the news
        train_start = time.perf_counter()
        step_rows = step_batch(self._trained_groups(rollouts), self.objective, self.cfg, self.pad_id)
        grad_norm, phase_times, values = self.update(step, step_rows, metrics, counts)
        sync_start = time.perf_counter()
        if self.cfg.train.save_rollouts and dist.get_rank() == 0:
            self._save_rollouts(step + 1, rollouts, step_rows, values)
        self.sync()
        sync_end = time.perf_counter()
        # collective: data-parallel all-reduce, last stage's broadcast
        reduced = {**rollout_values, **counts.reduce(local=True), **reduce_step_metrics(metrics)}
        step_s = time.perf_counter() - start
        extra = {
            **self.objective.step_values(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "time_rollout_s": rollouts.times.generate_s,
            "time_reward_s": rollouts.times.grade_s,
            "time_train_s": sync_start - train_start,  # the two below, and the updates
            **phase_times,
            "time_sync_s": sync_end - sync_start,
            "time_step_s": step_s,
            "tokens_per_s": rollouts.times.generated_tokens / step_s,
        }
        return step_record(step + 1, reduced, extra, setting_value(self.cfg.algorithm))

    def rollout(self, step: int) -> StepRollouts:
        """Generate and grade the step's groups (dynamic sampling included) with the engine awake."""
        self.engine.wake()
        rollouts = collect_step(  # collective: every group all-gathered from the rollout replicas
            self.engine,
            self.verifier,
            self.tokenizer,
            lambda count: [self.problems[i] for i in self.sampler.next_indices(count)],
            self.cfg,
            step_seed(self.cfg.seed, step),
            self.objective.has_signal,
        )
        self.engine.sleep()
        return rollouts

    def update(
        self, step: int, step_rows: PolicyBatch, metrics: MetricAccumulator, counts: MetricAccumulator
    ) -> tuple[float, dict[str, float], torch.Tensor]:
        """Train on the step's rows: this rank's share, the objective's forwards before the update, then per
        mini-batch its context (normalisers, a target's features), one optimiser step and what follows it.
        `metrics` gets this rank's share of the loss side, `counts` what every rank decides alike (updates
        skipped or refused). Returns the last gradient norm, the time of the extra forward passes, and the
        step's per-row values as the loss used them (every rank)."""
        from megatron.core import parallel_state

        cfg, objective = self.cfg, self.objective
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = rank_rows(step_rows, objective.dealt(step_rows), objective.carries_gradient(step_rows), cfg, dp, dp_rank)
        metrics.add_total(m.TRAINED_TOKENS, int(rows.batch.loss_mask.sum()))
        prepare_start = time.perf_counter()
        batch, values = objective.prepare(step_rows, rows.batch, self.forwards, metrics)  # collective
        prepare_s = time.perf_counter() - prepare_start
        context_s = 0.0
        grad_norm = float("nan")
        minis = batch.micro_batches(cfg.train.mini_batches)  # equal consecutive slices: the mini-batches
        for k, (mini, tokens, responses) in enumerate(zip(minis, rows.tokens, rows.responses, strict=True)):
            context_start = time.perf_counter()
            # collective: data-parallel all-reduce, a target's forward
            context = objective.mini_context(mini, tokens, responses, self.forwards, step * len(minis) + k)
            context_s += time.perf_counter() - context_start
            mini_metrics = MetricAccumulator()
            stepped = False
            if context.learns:  # global sums: every rank agrees
                # collective: pipeline forward-backward, gradient all-reduce, optimiser step
                grad_norm = self._optimizer_step(context, mini_metrics)
                stepped = math.isfinite(grad_norm)
                if not stepped:
                    self._refused(step, grad_norm, counts)
                else:
                    self.nonfinite_in_a_row = 0
            else:  # nothing to learn from: no gradient, and no Adam step that would move the weights anyway
                counts.add_total(m.SKIPPED_UPDATES, 1)
            objective.after_update(stepped, mini_metrics)  # collective where it keeps state
            metrics.merge(mini_metrics)
        return grad_norm, {"time_old_logprobs_s": prepare_s, "time_twin_forward_s": context_s}, values

    def _refused(self, step: int, grad_norm: float, counts: MetricAccumulator) -> None:
        """Count an update refused for a non-finite gradient norm; stop the run (a UserError on every rank)
        after train.max_nonfinite_steps of them in a row."""
        self.nonfinite_in_a_row += 1
        counts.add_total(m.NONFINITE_STEPS, 1)
        limit = self.cfg.train.max_nonfinite_steps
        if dist.get_rank() == 0:
            log.warning(
                f"step {step + 1}: gradient norm {grad_norm}: update refused, weights and optimiser state unchanged"
                f" ({self.nonfinite_in_a_row} in a row; the run stops at train.max_nonfinite_steps={limit})"
            )
        if self.nonfinite_in_a_row >= limit:
            last = latest_checkpoint(self.cfg.train.output_dir)
            raise UserError(
                f"training diverged: {self.nonfinite_in_a_row} updates in a row up to step {step + 1} had a"
                f" non-finite gradient norm (NaN or inf in the loss or the gradients), none was applied. Last"
                f" checkpoint: {last or 'none (train.checkpoint_every)'}; resume from it with a lower optim.lr"
                f" (or another fix of what diverged): popo train CONFIG train.resume_from={last or 'PATH'}"
            )

    def sync(self) -> None:
        """Stream the trainer's weights into the rollout engine."""
        from popo_megatron.rollout.weight_stream import iter_hf_weights

        bucket = self.cfg.train.weight_sync_bucket_mb * 2**20
        self.engine.wake()
        # collective: each bucket all-gathered over TP and broadcast over PP
        self.engine.update_weights(iter_hf_weights(self.ddp, self.args, self.cfg, bucket_bytes=bucket))

    # --- the parts of update ----------------------------------------------------------------------------
    @staticmethod
    def _trained_groups(rollouts: StepRollouts) -> list:
        # No group with a signal (dynamic sampling gave up): the generated ones, which teach nothing, keep the
        # schedule (POPO: no positive, nothing trains; GRPO: zero advantages).
        return rollouts.trained or rollouts.generated

    def _save_rollouts(self, step: int, rollouts: StepRollouts, step_rows: PolicyBatch, values: torch.Tensor) -> None:
        """OUTPUT_DIR/rollouts/step_NNNNNN.jsonl (trainer/rollout_records.py): each response with the weight
        (or advantage) the loss gave it, 0 where it carries no token into the loss."""
        used = values * step_rows.loss_mask.any(-1)
        trained = self._trained_groups(rollouts)
        records = response_records(rollouts.generated, self.tokenizer, step, trained, used, self.objective.value_name)
        write_records(self.cfg.train.output_dir, step_file(step), records)

    def _optimizer_step(self, context: MiniContext, metrics: MetricAccumulator) -> float:
        """Loss, backward and one optimiser step on a mini-batch (and the objective's head's, clipped together
        with the policy's gradients); returns the gradient norm before clipping. A non-finite norm (a NaN or
        inf loss or gradient: every rank sees the same all-reduced norm) refuses the step: the weights, the
        optimiser state and the LR schedule stay as they were."""
        objective = self.objective
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

        def loss_of(index, mb, logits, hidden):
            return objective.loss(index, mb, logits, hidden, context, metrics)

        forward_backward(self.ddp, context.micro_batches, loss_of, context.captures_hidden)
        head = objective.head if objective.uses_head else None
        if head is not None:
            head.finish_grad_sync()
        norm = clip_with_head(self.optimizer, head, self.cfg.optim.clip_grad)  # collective: model-parallel
        if not math.isfinite(norm):
            if head is not None:
                self.head_optimizer.zero_grad()
            return norm
        if head is not None:
            self.head_optimizer.step()
            self.head_optimizer.zero_grad()
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(1)
        self._follow_lr_schedule()
        return norm

    def _follow_lr_schedule(self) -> None:
        """Give the objective's head the policy's schedule (warm-up, decay) at its own peak rate:
        head_lr x lr / optim.lr (call after every scheduler step)."""
        if self.head_optimizer is None:
            return
        lr = self.cfg.optim.lr
        scale = self.optimizer.param_groups[0]["lr"] / lr if lr > 0 else 1.0
        for group in self.head_optimizer.param_groups:
            group["lr"] = self.objective.head_lr * scale

    # --- checkpoints and the end --------------------------------------------------------------------------
    def _trained(self) -> Trained:
        objective = self.objective
        target = objective.target if objective.saves_target else None
        return Trained(self.model, self.optimizer, target, objective.head, self.head_optimizer)

    def estimated_save_s(self) -> float:
        """What a first checkpoint should take on this rank, before one was measured: its weights, Adam's
        fp32 master weights and two moments, and the EMA target, at SAVE_BYTES_PER_S."""
        params = sum(p.numel() for p in self.model.parameters())
        target = self.objective.target if self.objective.saves_target else None
        return (params * (self.model.config.params_dtype.itemsize + 12) + (target.nbytes if target else 0)) / (
            SAVE_BYTES_PER_S
        )

    def save(self) -> None:
        """Checkpoint the run at its current step (collective)."""
        trainer_state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "objective": self.objective.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }
        save_training_checkpoint(self._trained(), trainer_state, self.args, self.cfg)

    def close(self) -> None:
        if not self._closed:
            self.verifier.close()
            self.engine.shutdown()
            self._closed = True


def rollout_metrics(rollouts: StepRollouts, objective: Objective) -> MetricAccumulator:
    """The step's rollout metrics: they describe every group sampled in the step (all rounds)."""
    generated = rollouts.generated
    metrics = MetricAccumulator()
    add_grade_metrics([g for group in generated for g in group.grades], metrics)
    restated = sum(
        g.correct and restates_problem(g.answer, group.problem.problem) for group in generated for g in group.grades
    )
    metrics.add_total(m.RESTATED_PROBLEM, restated)
    group_stats(objective.positive(torch.tensor([g.rewards for g in generated]))).add_to(metrics)
    lengths = [len(r.token_ids) for g in generated for r in g.responses]
    metrics.add_mean(m.RESPONSE_LENGTH, sum(lengths), len(lengths))
    metrics.add_mean(m.RESPONSE_TRUNCATED, sum(r.truncated for g in generated for r in g.responses), len(lengths))
    metrics.add_mean(m.ROUNDS, rollouts.rounds, 1)
    metrics.add_mean(m.GROUPS_TRAINED, len(rollouts.trained), 1)
    return metrics


def reduce_step_metrics(metrics: MetricAccumulator) -> dict[str, float]:
    """The update's metrics, each rank's share reduced over data-parallel ranks; the loss metrics from the last
    stage, the others (trained tokens) are everywhere (collective over the data-parallel and pipeline groups)."""
    from megatron.core import parallel_state

    reduced = metrics.reduce(parallel_state.get_data_parallel_group())
    everywhere = {k: v for k, v in reduced.items() if m.METRICS[k].where == m.Where.every_rank}
    return {**from_last_stage(reduced), **everywhere}
