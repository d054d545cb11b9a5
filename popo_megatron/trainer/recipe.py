"""POPO (or GRPO) training on one rank, as a recipe: `setup` builds the run (or resumes it), a step is
`rollout` -> `update` -> `sync`, `save` writes a checkpoint, `close` stops the engine and the verifier.

    prompts -> rollout (vLLM, n per prompt) -> reward (math-verify pool) -> positives and weights
            -> old log-probs (trainer forward, optional) -> per mini-batch: twin forward (hidden states)
            -> loss, backward, optimiser step -> twin EMA and momentum -> weight sync to vLLM
            -> metrics -> checkpoint on schedule or on signal (trainer/loop.py)

Every rank runs every method, and every collective is named where it is called (`# collective:`): the ranks
of its group must all reach it, the same number of times.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from popo_megatron import metrics as m
from popo_megatron.algo.advantages import group_stats
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.drift import SimilarityBeta, TwinMomentum
from popo_megatron.algo.predictor import SimilarityPredictor, build_predictor_optimizer, clip_with_predictor
from popo_megatron.algo.step import LossSettings, Normalizers, forward_backward, forward_only, loss_normalizers
from popo_megatron.algo.twin import TwinParams
from popo_megatron.checkpoint.runs import plan_resume
from popo_megatron.checkpoint.training import Trained, load_training_checkpoint, save_training_checkpoint
from popo_megatron.config.schema import Algorithm, OldLogprobs, Predictor, setting_value
from popo_megatron.data.problems import ProblemSet
from popo_megatron.data.sampler import PromptSampler
from popo_megatron.logs import get_logger
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.model.hf_config import HFModelArgs
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
_TWIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Recipe:
    """A training run on this rank: the model and its optimiser, the twin, the data, the verifier and the
    rollout engine, and the step they are at."""

    cfg: DictConfig
    args: HFModelArgs
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    settings: LossSettings
    problems: ProblemSet
    sampler: PromptSampler
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    verifier: Verifier
    engine: RolloutEngine
    momentum: TwinMomentum
    beta: SimilarityBeta
    twin: TwinParams | None  # POPO's siamese twin
    reference: TwinParams | None  # GRPO's frozen initial policy (KL)
    predictor: SimilarityPredictor | None  # the linear predictor, on the last pipeline stage
    predictor_optimizer: torch.optim.Optimizer | None

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self._closed = False

    @property
    def model(self) -> torch.nn.Module:
        return self.ddp.module

    # --- setup ------------------------------------------------------------------------------------------
    def setup(self) -> Recipe:
        """Build everything for the config, then resume from OUTPUT_DIR (or train.resume_from) when asked."""
        from megatron.core.parallel_state import is_pipeline_last_stage
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
        popo = cfg.algorithm == Algorithm.popo
        twin_cfg = cfg.popo.twin
        self.twin = None
        if popo and twin_cfg.enabled:
            self.twin = TwinParams(self.ddp, _TWIN_DTYPES[setting_value(twin_cfg.dtype)], twin_cfg.cpu_offload)
        self.reference = TwinParams(self.ddp) if not popo and cfg.grpo.kl_beta > 0 else None
        self.beta = SimilarityBeta(cfg.popo.similarity, twin_cfg.momentum.d_target)
        self.settings = LossSettings.from_config(cfg, self.args.vocab_size, temperature=cfg.rollout.temperature)
        if self.twin is not None:  # the penalty's weight as the adaptive controller starts it (within its bounds)
            self.settings = replace(self.settings, similarity_beta=self.beta.value)
        self.predictor = self.predictor_optimizer = None
        if self.uses_predictor and is_pipeline_last_stage():
            self.predictor = SimilarityPredictor(self.args.hidden_size, cfg.parallel.sequence_parallel)
            self.predictor_optimizer = build_predictor_optimizer(self.predictor, cfg)
        self.problems = load_dataset(cfg.data)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.sampler = PromptSampler(len(self.problems), cfg.data.shuffle_seed)
        self.verifier = MathVerifier(cfg.reward, literal_answers_by_default(cfg.data))
        self.engine = vllm_engine(cfg, cfg.model.hf_path)
        self.momentum = TwinMomentum(twin_cfg.momentum, total_updates)
        self._follow_lr_schedule()
        self._resume()
        return self

    @property
    def uses_predictor(self) -> bool:
        """The run trains a linear predictor (it lives on the last pipeline stage; every rank knows)."""
        return self.settings.uses_twin_hidden and self.cfg.popo.similarity.predictor == Predictor.linear

    def _resume(self) -> None:
        resume = plan_resume(self.cfg)
        if resume is None:
            return
        state = load_training_checkpoint(resume.checkpoint, self._trained(), self.args, self.cfg)  # collective
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.momentum.load_state_dict(state["momentum"])
        if "beta" in state:  # checkpoints from before the adaptive beta keep the configured one
            self.beta.load_state_dict(state["beta"])
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
        rollout_values = rollout_metrics(rollouts).reduce(local=True)
        metrics = MetricAccumulator()
        step_rows = self._step_batch(rollouts)
        if self.cfg.train.save_rollouts and dist.get_rank() == 0:
            self._save_rollouts(step + 1, rollouts, step_rows)
        train_start = time.perf_counter()
        grad_norm, phase_times = self.update(step_rows, metrics)
        sync_start = time.perf_counter()
        self.sync()
        sync_end = time.perf_counter()
        # collective: data-parallel all-reduce, last stage's broadcast
        reduced = {**rollout_values, **reduce_step_metrics(metrics)}
        step_s = time.perf_counter() - start
        extra = {
            "twin_momentum": self.momentum.value if self.twin is not None else float("nan"),
            "similarity_beta": self.beta.value if self.twin is not None else float("nan"),
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
        )
        self.engine.sleep()
        return rollouts

    def update(self, step_rows: PolicyBatch, metrics: MetricAccumulator) -> tuple[float, dict[str, float]]:
        """Train on the step's rows (`_step_batch`): this rank's share, their old (and reference) log-probs,
        then per mini-batch the twin's hidden states, one optimiser step and the twin's EMA. Returns the last
        gradient norm and the time of the extra forward passes."""
        from megatron.core import parallel_state

        cfg = self.cfg
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = rank_rows(step_rows, cfg, dp, dp_rank)
        metrics.add_total(m.TRAINED_TOKENS, int(rows.batch.loss_mask.sum()))
        old_start = time.perf_counter()
        batch = self._with_old_logprobs(rows.batch)  # collective (when computed): a pipeline forward
        old_s = time.perf_counter() - old_start
        twin_s = 0.0
        grad_norm = float("nan")
        minis = batch.micro_batches(cfg.train.mini_batches)  # equal consecutive slices: the mini-batches
        for mini, tokens in zip(minis, rows.tokens, strict=True):
            settings = self.settings
            if self.twin is not None:  # beta as the adaptive controller (if on) has it now
                settings = replace(settings, similarity_beta=self.beta.value)
            normalizers = loss_normalizers(mini, settings, tokens)  # collective: data-parallel all-reduce
            learns = normalizers.policy > 0 or normalizers.similarity > 0  # global sums: every rank agrees
            twin_hidden = None
            if settings.uses_twin_hidden and learns:
                twin_start = time.perf_counter()
                twin_hidden = self._twin_hidden(mini, settings)  # collective: a pipeline forward
                twin_s += time.perf_counter() - twin_start
            mini_metrics = MetricAccumulator()
            if learns:
                # collective: pipeline forward-backward, gradient all-reduce, optimiser step
                grad_norm = self._optimizer_step(mini, settings, normalizers, twin_hidden, mini_metrics)
            else:  # nothing to learn from: no gradient, and no Adam step that would move the weights anyway
                mini_metrics.add_total(m.SKIPPED_UPDATES, 1)
            if self.twin is not None:
                self._advance_twin(mini_metrics)  # collective: the drift's all-reduce and broadcast
            metrics.merge(mini_metrics)
        return grad_norm, {"time_old_logprobs_s": old_s, "time_twin_forward_s": twin_s}

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

    def _step_batch(self, rollouts: StepRollouts) -> PolicyBatch:
        """Every row of the groups the step trains on, with its weight or advantage (every rank)."""
        return step_batch(self._trained_groups(rollouts), self.cfg, self.pad_id)

    def _save_rollouts(self, step: int, rollouts: StepRollouts, step_rows: PolicyBatch) -> None:
        """OUTPUT_DIR/rollouts/step_NNNNNN.jsonl (trainer/rollout_records.py): each response with the weight
        (or advantage) the loss gives it, 0 where it carries no token into the loss."""
        used = step_rows.sample_weights * step_rows.loss_mask.any(-1)
        key = "weight" if self.cfg.algorithm == Algorithm.popo else "advantage"
        records = response_records(rollouts.generated, self.tokenizer, step, self._trained_groups(rollouts), used, key)
        write_records(self.cfg.train.output_dir, step_file(step), records)

    def _micro_batches(self, mini: PolicyBatch) -> list[PolicyBatch]:
        """The micro-batches of a mini-batch, for every forward of it: the old log-probs, the twin, the update.
        The same shapes everywhere, so that on-policy ratios are exactly 1, not 1 up to kernel noise."""
        return mini.micro_batches(max(1, mini.size // self.cfg.train.micro_batch_size))  # rank_rows' sizes

    def _forward_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        minis = batch.micro_batches(self.cfg.train.mini_batches)
        micro = [mb for mini in minis for mb in self._micro_batches(mini)]
        outputs = forward_only(self.ddp, micro, self.settings)
        return torch.cat([o.logprobs.cpu() for o in outputs]) if outputs else None

    def _with_old_logprobs(self, batch: PolicyBatch) -> PolicyBatch:
        """pi_old from the trainer (popo.old_logprobs=trainer, or TIS) or the engine, and GRPO's reference."""
        if self.cfg.popo.old_logprobs == OldLogprobs.trainer or self.settings.tis_cap is not None:
            old = self._forward_logprobs(batch)
        else:
            old = batch.rollout_logprobs
        with_old = batch.with_fields(old_logprobs=old)
        if self.reference is None:
            return with_old
        with self.reference.swapped_in():
            return with_old.with_fields(ref_logprobs=self._forward_logprobs(batch))

    def _twin_hidden(self, mini: PolicyBatch, settings: LossSettings) -> list[torch.Tensor]:
        """The twin's final hidden states of each micro-batch (last pipeline stage)."""
        with self.twin.swapped_in():
            outputs = forward_only(self.ddp, self._micro_batches(mini), settings, hidden=True, logprobs=False)
        return [o.hidden for o in outputs]

    def _optimizer_step(
        self,
        mini: PolicyBatch,
        settings: LossSettings,
        normalizers: Normalizers,
        twin_hidden: list[torch.Tensor] | None,
        metrics: MetricAccumulator,
    ) -> float:
        """Loss, backward and one optimiser step on a mini-batch (and the predictor's, clipped together with
        the policy's gradients); returns the gradient norm before clipping."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics.merge(
            forward_backward(self.ddp, self._micro_batches(mini), settings, normalizers, twin_hidden, self.predictor)
        )
        joint_norm = None
        if self.uses_predictor:
            if self.predictor is not None:
                self.predictor.finish_grad_sync()
            joint_norm = clip_with_predictor(self.optimizer, self.ddp, self.predictor, self.cfg.optim.clip_grad)
            if self.predictor is not None:
                self.predictor_optimizer.step()
                self.predictor_optimizer.zero_grad()
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        self._follow_lr_schedule()
        return joint_norm if joint_norm is not None else grad_norm

    def _advance_twin(self, mini_metrics: MetricAccumulator) -> None:
        """The twin's EMA at the current momentum, then the momentum and beta controllers, on the drift the
        update measured (None without an update)."""
        from megatron.core import parallel_state

        drift = mini_metrics.reduce(parallel_state.get_data_parallel_group()).get(m.POPO_SIMILARITY.name)
        drift = from_last_stage(drift)
        self.twin.update(self.momentum.value)
        self.momentum.advance(drift)
        self.beta.advance(drift)

    def _follow_lr_schedule(self) -> None:
        """Give the predictor the policy's schedule (warm-up, decay) at its own peak rate:
        predictor_lr x lr / optim.lr (call after every scheduler step)."""
        if self.predictor_optimizer is None:
            return
        lr = self.cfg.optim.lr
        scale = self.optimizer.param_groups[0]["lr"] / lr if lr > 0 else 1.0
        for group in self.predictor_optimizer.param_groups:
            group["lr"] = self.cfg.popo.similarity.predictor_lr * scale

    # --- checkpoints and the end --------------------------------------------------------------------------
    def _trained(self) -> Trained:
        return Trained(self.model, self.optimizer, self.twin, self.predictor, self.predictor_optimizer)

    def save(self) -> None:
        """Checkpoint the run at its current step (collective)."""
        trainer_state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "momentum": self.momentum.state_dict(),
            "beta": self.beta.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }
        save_training_checkpoint(self._trained(), trainer_state, self.args, self.cfg)

    def close(self) -> None:
        if not self._closed:
            self.verifier.close()
            self.engine.shutdown()
            self._closed = True


def rollout_metrics(rollouts: StepRollouts) -> MetricAccumulator:
    """The step's rollout metrics: they describe every group sampled in the step (all rounds)."""
    generated = rollouts.generated
    metrics = MetricAccumulator()
    add_grade_metrics([g for group in generated for g in group.grades], metrics)
    restated = sum(
        g.correct and restates_problem(g.answer, group.problem.problem) for group in generated for g in group.grades
    )
    metrics.add_total(m.RESTATED_PROBLEM, restated)
    group_stats(torch.tensor([g.rewards for g in generated])).add_to(metrics)
    lengths = [len(r.token_ids) for g in generated for r in g.responses]
    metrics.add_mean(m.RESPONSE_LENGTH, sum(lengths), len(lengths))
    metrics.add_mean(m.RESPONSE_TRUNCATED, sum(r.truncated for g in generated for r in g.responses), len(lengths))
    metrics.add_mean(m.ROUNDS, rollouts.rounds, 1)
    metrics.add_mean(m.GROUPS_TRAINED, len(rollouts.trained), 1)
    return metrics


def from_last_stage(value):
    """`value` as the last pipeline stage has it (the loss and its metrics live there), on every stage
    (collective over the pipeline group)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    holder = [value]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]


def reduce_step_metrics(metrics: MetricAccumulator) -> dict[str, float]:
    """The update's metrics, each rank's share reduced over data-parallel ranks; the loss metrics from the last
    stage, the others (trained tokens) are everywhere (collective over the data-parallel and pipeline groups)."""
    from megatron.core import parallel_state

    reduced = metrics.reduce(parallel_state.get_data_parallel_group())
    everywhere = {k: v for k, v in reduced.items() if m.METRICS[k].where == m.Where.every_rank}
    return {**from_last_stage(reduced), **everywhere}
