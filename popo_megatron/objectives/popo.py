"""POPO as its authors define it (momo1443/colm2026-POPO), with this project's extensions as options.

For each prompt, G rollouts from the current policy, positives S+ = {i : r_i > tau_r}:

    w_i    = softmax_{j in S+} (lbar_j / T_w),  lbar_j the mean token log-prob under the generating policy
    L_NLL  = sum_i w_i sum_t -log pi(o_it) / N+                     N+: the response tokens of rows with w > 0
    L_sim  = -sum_i w_i cos(h_phi(z_i), stopgrad(z~_i + eps)) / sum_i w_i
    L_ent  = -(mean token entropy over every response, negatives included)
    L      = L_NLL + alpha L_sim + beta_ent L_ent

z_i is the online model's final-norm output averaged over o_i's response tokens, z~_i the same of the EMA
target xi (xi <- tau xi + (1 - tau) theta after every optimiser step), eps ~ N(0, sigma^2) drawn per row
from the run's seed, h_phi the predictor MLP (algo/predictor.py). Logits are divided by the sampling
temperature. N+, sum w and the entropy's token count are sums over the whole mini-batch (every micro-batch
and data-parallel rank): the split-invariant form of the authors' per-micro-batch normalisers, equal to it
with one micro-batch.

What is forwarded: the weights need pi_old of the positives only (a no-grad trainer forward, or the
engine's log-probs with loss.old_logprobs=rollout); the target's features only for rows with w > 0; the
negatives enter the update only for the entropy bonus (not at all with beta_ent = 0).

The extensions (docs/algorithm.md): weights success_scaled / grpo_matched, the normalisers weighted_tokens /
all_tokens, a bounded importance ratio for stale rollouts (popo.is_bound), the per-token similarity, the
adaptive momentum and alpha laws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig

from popo_megatron import metrics as m
from popo_megatron.algo.advantages import popo_weights, positive_mask
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.drift import SimilarityWeight, TwinMomentum
from popo_megatron.algo.hidden import held_columns, pooled_features
from popo_megatron.algo.losses import (
    bounded_is_sum,
    k3,
    per_token_distance_sum,
    pooled_similarity_sum,
    safe_denominator,
    weighted_nll_sum,
)
from popo_megatron.algo.predictor import LinearPredictor, MLPPredictor
from popo_megatron.algo.step import Forwards, as_rows, first_rows_of, from_last_stage
from popo_megatron.algo.twin import TwinParams
from popo_megatron.config.schema import (
    ISBoundMode,
    PerTokenPredictor,
    PopoNormalizer,
    PopoWeights,
    SimilarityForm,
    setting_value,
)
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.model.context_parallel import sum_over_context_parallel
from popo_megatron.objectives.base import (
    MiniContext,
    Objective,
    ObjectiveContext,
    add_logprob_mismatch,
    add_loss_share,
    global_sums,
    logprob_settings,
    old_logprobs,
    tis_token_weights,
    uses_trainer_logprobs,
)

_TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def target_noise(rows: torch.Tensor, dim: int, std: float, seed: int, update: int) -> torch.Tensor:
    """[len(rows), dim] N(0, std^2) noise for the target features of the step's rows `rows` at optimiser
    step `update`: each row's from its own generator, seeded by (seed, update, row), so the noise is the
    same at every layout and in every resumed run."""
    out = torch.empty(len(rows), dim)
    generator = torch.Generator()
    for i, row in enumerate(rows.tolist()):
        key = hashlib.sha256(f"popo-target-noise:{seed}:{update}:{row}".encode()).digest()
        generator.manual_seed(int.from_bytes(key[:8], "little"))
        out[i] = torch.randn(dim, generator=generator)
    return out * std


@dataclass
class PopoContext(MiniContext):
    policy_norm: float = 0.0  # the policy term's normaliser (popo.normalizer)
    positive_tokens: float = 0.0  # N+: response tokens of the rows with w > 0
    weight_sum: float = 0.0  # sum_i w_i
    entropy_tokens: float = 0.0  # response tokens of every row forwarded (the entropy's mean)
    similarity_norm: float = 0.0  # per_token similarity: its token count (the positives' response tokens)
    target_features: torch.Tensor | None = None  # [mini rows, H] pooled target features (0 where w = 0)
    noisy_target: torch.Tensor | None = None  # the same plus the noise (what L_sim compares with)
    target_hidden: list[torch.Tensor] = field(default_factory=list)  # per micro-batch (per_token)
    target_logprobs: list[torch.Tensor] = field(default_factory=list)  # per micro-batch (KL steps)


class PopoObjective(Objective):
    name = "popo"
    value_name = "weight"

    def __init__(self, cfg: DictConfig, context: ObjectiveContext, model: torch.nn.Module) -> None:
        from megatron.core import parallel_state

        super().__init__(context)
        self.cfg = cfg
        self.model = model
        self.settings = logprob_settings(context)
        self.pooled = cfg.similarity == SimilarityForm.pooled
        self.entropy_bonus = cfg.beta_ent > 0
        self.bounded = cfg.is_bound.mode != ISBoundMode.none
        self.low_entropy_warning = cfg.low_entropy_warning
        target = cfg.target
        if cfg.alpha > 0 or cfg.adaptive_alpha.enabled:
            self.target = TwinParams(model, _TARGET_DTYPES[setting_value(target.dtype)], target.cpu_offload)
            self.saves_target = True
        self.momentum = TwinMomentum(target, context.total_updates)
        self.alpha = SimilarityWeight(cfg.alpha, cfg.adaptive_alpha, target.adaptive.d_target)
        linear = cfg.per_token.predictor == PerTokenPredictor.linear
        self.uses_head = self.target is not None and (self.pooled or linear)
        if self.uses_head:
            self.head_lr = (cfg.predictor.lr or context.optim.lr) if self.pooled else cfg.per_token.predictor_lr
            if parallel_state.is_pipeline_last_stage():
                hidden = context.hidden_size
                if self.pooled:
                    self.head = MLPPredictor(hidden, cfg.predictor.hidden, cfg.predictor.layers, context.seed)
                else:
                    self.head = LinearPredictor(hidden, context.sequence_parallel)

    # --- the step's rows ---------------------------------------------------------------------------------
    def positive(self, rewards: torch.Tensor) -> torch.Tensor:
        return positive_mask(rewards, self.cfg.reward_threshold)

    def row_values(self, rewards: torch.Tensor) -> torch.Tensor:
        # The weights need the generating policy's log-probs and the lengths: `prepare` computes them.
        return torch.zeros_like(rewards)

    def has_signal(self, rewards: Sequence[float]) -> bool:
        return any(r > self.cfg.reward_threshold for r in rewards)

    def dealt(self, batch: PolicyBatch) -> torch.Tensor:
        # With the entropy bonus every rollout is forwarded; without it only the positives have a term.
        return torch.ones(batch.size, dtype=torch.bool) if self.entropy_bonus else batch.positive

    def carries_gradient(self, batch: PolicyBatch) -> torch.Tensor:
        return self.dealt(batch)

    # --- before the update -------------------------------------------------------------------------------
    def prepare(
        self, step: PolicyBatch, mine: PolicyBatch, forwards: Forwards, metrics: MetricAccumulator
    ) -> tuple[PolicyBatch, torch.Tensor]:
        """The step's weights (every rank), this rank's rows with theirs, and pi_old for a bounded ratio."""
        G = self.context.group_size
        old = old_logprobs(mine, forwards, self.context, metrics) if self.bounded else None
        mean_logprobs = None
        if self.cfg.weights == PopoWeights.softmax:
            mean_logprobs = self._mean_logprobs(step, mine, old, forwards, metrics).view(-1, G)
        lengths = step.response_lengths().view(-1, G) if self.cfg.length_normalize else None
        weights = popo_weights(
            step.positive.view(-1, G), self.cfg.weights, mean_logprobs, self.cfg.weight_temperature, lengths
        ).reshape(-1)
        mine_weights = torch.where(mine.rows >= 0, weights[mine.rows.clamp(min=0)], 0.0)
        return mine.with_fields(sample_weights=mine_weights, old_logprobs=old), weights

    def _mean_logprobs(
        self,
        step: PolicyBatch,
        mine: PolicyBatch,
        old: torch.Tensor | None,
        forwards: Forwards,
        metrics: MetricAccumulator,
    ) -> torch.Tensor:
        """lbar [step rows]: each positive's mean token log-prob under the generating policy, on every rank."""
        from megatron.core import parallel_state

        if not uses_trainer_logprobs(self.context.loss):
            return _row_means(step.rollout_logprobs, step.loss_mask)
        if not self.bounded:  # the positives alone (the only rows whose weight needs it), in padded micro-batches
            rows = mine.positive.nonzero().squeeze(-1)
            positives = mine[rows]
            logprobs = forwards.rows(positives, logprobs=True).logprobs
            if logprobs is not None and positives.rollout_logprobs is not None:
                add_logprob_mismatch(logprobs, positives.rollout_logprobs, positives.loss_mask, metrics)
        else:  # the ratio's forward covered them
            rows, logprobs = torch.arange(mine.size), old
        means = torch.zeros(step.size, dtype=torch.float64, device=_device())
        if parallel_state.is_pipeline_last_stage():
            picked = mine[rows]
            if len(rows):
                own = _row_means(logprobs, picked.loss_mask).to(means.device, torch.float64)
                valid = (picked.rows >= 0) & picked.positive
                means[picked.rows[valid].to(means.device)] = own[valid.to(means.device)]
            if parallel_state.get_data_parallel_world_size() > 1:  # each rank filled its own rows
                dist.all_reduce(means, group=parallel_state.get_data_parallel_group())
        return from_last_stage(means.cpu())

    def mini_context(
        self, mini: PolicyBatch, tokens: float, responses: float, forwards: Forwards, update: int
    ) -> PopoContext:
        weights, lengths = mini.sample_weights.double(), mini.response_lengths().double()
        active = weights > 0
        positive_tokens, weight_sum, weighted_tokens, entropy_tokens, similarity_tokens = global_sums(
            [
                lengths[active].sum(),
                weights.sum(),
                (weights * lengths).sum(),
                lengths.sum(),
                lengths[mini.positive].sum(),
            ]
        )
        policy_norm = {
            PopoNormalizer.positive_tokens: positive_tokens,
            PopoNormalizer.weighted_tokens: weighted_tokens,
            PopoNormalizer.all_tokens: tokens,
        }[self.cfg.normalizer]
        per_token_learns = not self.pooled and self.target is not None and similarity_tokens > 0
        context = PopoContext(
            learns=positive_tokens > 0 or per_token_learns,
            micro_batches=forwards.micro_batches(mini),
            captures_hidden=self.target is not None,
            policy_norm=policy_norm,
            positive_tokens=positive_tokens,
            weight_sum=weight_sum,
            entropy_tokens=entropy_tokens,
            similarity_norm=similarity_tokens,
        )
        if self.target is not None and context.learns:
            self._target_forward(mini, forwards, update, context)
        return context

    def _target_forward(self, mini: PolicyBatch, forwards: Forwards, update: int, context: PopoContext) -> None:
        """The EMA target's features of the mini-batch: pooled over the rows with w > 0 (pooled), or its
        hidden states in the update's micro-batches (per_token); on KL steps also its log-probs of every row."""
        from megatron.core import parallel_state

        kl_every = self.cfg.target.kl_every
        kl_step = kl_every > 0 and update % kl_every == 0
        active = (mini.sample_weights > 0).nonzero().squeeze(-1)
        with self.target.swapped_in():
            if kl_step or not self.pooled:  # every row, in the update's shapes
                micro = context.micro_batches
                outputs = forwards.run(micro, logprobs=kl_step, hidden=not self.pooled, pooled=self.pooled)
                width = mini.tokens.shape[1]
                pooled = as_rows(micro, outputs, mini.size, width, first_rows_of(micro)).pooled
            else:  # only the rows whose features the loss reads (maybe none on this data-parallel rank)
                read = forwards.rows(mini[active], pooled=True).pooled
                pooled = torch.zeros(mini.size, self.context.hidden_size, device=_device())
                if read is not None:
                    pooled[active.to(pooled.device)] = read.to(pooled.device)
        if not parallel_state.is_pipeline_last_stage():
            return
        if kl_step:
            context.target_logprobs = [o.logprobs for o in outputs]
        if not self.pooled:
            context.target_hidden = [o.hidden for o in outputs]
            return
        noise = torch.zeros_like(pooled)
        std = self.cfg.predictor.noise_std
        if std > 0 and len(active):
            rows = mini.rows[active]
            noise[active.to(noise.device)] = target_noise(rows, pooled.shape[-1], std, self.context.seed, update).to(
                noise.device
            )
        context.target_features, context.noisy_target = pooled, pooled + noise

    # --- the update ----------------------------------------------------------------------------------------
    def loss(
        self,
        index: int,
        mb: PolicyBatch,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        context: PopoContext,
        metrics: MetricAccumulator,
    ) -> torch.Tensor:
        mask, weights = mb.loss_mask, mb.sample_weights
        active = weights > 0
        lp, ent = self.settings.logprobs(logits, mb, with_entropy=True)
        metrics.add_masked(m.ENTROPY, ent, mask)
        metrics.add_masked(m.POPO_WEIGHT, weights, active, extremes=True)
        token_weights = mb.per_token(weights)
        nll_sum = weighted_nll_sum(lp, mask, token_weights)
        nll = nll_sum / safe_denominator(context.positive_tokens)
        if self.bounded:
            tis = tis_token_weights(mb, self.context.loss, metrics)
            policy_sum = bounded_is_sum(lp, mb.old_logprobs, mask, token_weights, self.cfg.is_bound, tis, metrics)
        else:
            policy_sum = nll_sum
        policy = policy_sum / safe_denominator(context.policy_norm)
        # Each term is a mean over its own support (the paper's convention); a normaliser other than N+ scales
        # the policy term against the others by this factor, reported so that the scale is never silent.
        scale = context.positive_tokens / safe_denominator(context.policy_norm)
        add_loss_share(metrics, m.POPO_POLICY_SCALE, torch.tensor(scale, dtype=torch.float64), context)
        loss = policy
        if self.target is not None:
            similarity = self._similarity(index, mb, hidden, context, metrics)
            add_loss_share(metrics, m.LOSS_SIMILARITY, similarity, context)
            loss = loss + self.alpha.value * similarity
        entropy = -torch.where(mask, ent, 0.0).sum() / safe_denominator(context.entropy_tokens)
        if self.entropy_bonus:
            loss = loss + self.cfg.beta_ent * entropy
        if context.target_logprobs:  # monitoring only: KL(pi || target) by k3, every row's tokens
            kl = k3(torch.where(mask, context.target_logprobs[index] - lp.detach(), 0.0))
            metrics.add_masked(m.POPO_KL, kl, mask)
        add_loss_share(metrics, m.LOSS_NLL, nll, context)
        add_loss_share(metrics, m.LOSS_ENTROPY, entropy, context)
        add_loss_share(metrics, m.LOSS_POLICY, policy, context)
        add_loss_share(metrics, m.LOSS_TOTAL, loss, context)
        return loss

    def _similarity(
        self,
        index: int,
        mb: PolicyBatch,
        hidden: torch.Tensor,
        context: PopoContext,
        metrics: MetricAccumulator,
    ) -> torch.Tensor:
        """This micro-batch's share of L_sim (pooled) or of the per-token distance."""
        from megatron.core import tensor_parallel

        sequence_parallel = self.context.sequence_parallel
        weights = mb.sample_weights
        if self.pooled:
            # The mini-batch rows of this micro-batch: a consecutive slice, or a pack's sequences.
            rows = slice(index * mb.size, (index + 1) * mb.size) if mb.layout is None else mb.layout.origin
            online = pooled_features(hidden, mb, sequence_parallel)
            predicted = self.head(online)
            target = context.noisy_target[rows]
            clean = context.target_features[rows]
            drift = 1.0 - F.cosine_similarity(online.detach(), clean, dim=-1)
            metrics.add_masked(m.POPO_DRIFT, drift, (weights > 0).to(drift.device))
            return pooled_similarity_sum(predicted, target, weights.to(predicted.device)) / safe_denominator(
                context.weight_sum
            )
        sim_mask = (mb.loss_mask & mb.per_token(mb.positive)).transpose(0, 1)  # [T, P], like the hidden states
        local = sim_mask[held_columns(mb, sequence_parallel).to(sim_mask.device)]
        distance = per_token_distance_sum(hidden, context.target_hidden[index], local, self.head)
        if sequence_parallel:
            # Each TP rank holds its own slice of the sequence: sum the slices (backward: identity, so each
            # slice's hidden states get the gradient of the whole sum).
            distance = tensor_parallel.reduce_from_tensor_model_parallel_region(distance)
        distance = sum_over_context_parallel(distance)  # each CP rank holds its share of each sequence
        metrics.add_mean(m.POPO_DRIFT, distance.detach(), sim_mask.sum())
        return distance / safe_denominator(context.similarity_norm)

    def after_update(self, stepped: bool, metrics: MetricAccumulator) -> None:
        """The EMA target's update after an optimiser step, then the momentum and alpha laws on the drift the
        update measured (collective: the drift's all-reduce and broadcast)."""
        from megatron.core import parallel_state

        if self.target is None or not stepped:
            return
        drift = metrics.reduce(parallel_state.get_data_parallel_group()).get(m.POPO_DRIFT.name)
        drift = from_last_stage(drift)
        self.target.update(self.momentum.value)
        self.momentum.advance(drift)
        self.alpha.advance(drift)

    # --- what the run reports and keeps ----------------------------------------------------------------
    def step_values(self) -> dict[str, float]:
        on = self.target is not None
        return {
            "twin_momentum": self.momentum.value if on else float("nan"),
            "alpha": self.alpha.value if on else float("nan"),
        }

    def state_dict(self) -> dict:
        return {"momentum": self.momentum.state_dict(), "alpha": self.alpha.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.momentum.load_state_dict(state["momentum"])
        self.alpha.load_state_dict(state["alpha"])


def _row_means(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: each row's mean over its masked tokens (0 for an empty row)."""
    mask = mask.to(logprobs.device)
    return torch.where(mask, logprobs, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def _device() -> torch.device:
    from popo_megatron.platform import collective_device

    return collective_device()
