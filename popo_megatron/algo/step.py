"""POPO and GRPO on Megatron-Core's forward_backward_func.

Two entry points, both collective over the model-parallel world and run with
any TP / PP / SP layout and any number of micro-batches:

- `forward_only`: a no-grad pass giving, on the last pipeline stage, per
  micro-batch log-probs (and entropy) of the target tokens and/or the final
  hidden states: the old log-probs of a step, the twin's hidden states (with
  the twin swapped in), a reference policy's log-probs.
- `forward_backward`: the training pass. Each micro-batch's loss is its share
  of the global batch's loss (losses.py); Megatron divides a micro-batch loss
  by the number of micro-batches and DDP averages gradients over data-parallel
  ranks, so the share is multiplied back by both and the gradients are those
  of the global batch's loss, whatever the split (tested: 1 vs 4
  micro-batches, DP=1 vs DP=2).

The loss normalisers (`Normalizers`) are global sums over the whole batch of
every data-parallel rank, computed before the pass. POPO's policy loss is
normalised (`popo.loss_normalizer`) either by sum_i w_i |o_i| over the
positives (`positive_tokens`: the weights' overall scale cancels) or by the
response tokens of every rollout, negatives included (`all_tokens`, GRPO's
token mean: the weights act in absolute terms). GRPO's is the number of
response tokens (token mean). Rows without a gradient are left out of a batch
(POPO's negatives; GRPO's zero-advantage rows when there is no KL term), so
the caller passes the count of every rollout's tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from popo_megatron import metrics as m
from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.hidden import capture_final_hidden, sequence_slice
from popo_megatron.algo.logprobs import vocab_parallel_logprobs
from popo_megatron.algo.losses import (
    grpo_policy_loss,
    popo_policy_loss,
    safe_denominator,
    similarity_sum,
    truncated_is_weights,
)
from popo_megatron.config.schema import Algorithm, ISBoundConfig, LossNormalizer, RolloutCorrection
from popo_megatron.metrics import MetricAccumulator
from popo_megatron.model.forward import unwrap_model
from popo_megatron.platform import collective_device


@dataclass(frozen=True)
class LossSettings:
    """Everything the loss of a micro-batch needs besides the data."""

    algorithm: Algorithm
    vocab_size: int  # the real vocabulary; padded ids are excluded from the softmax
    temperature: float  # the rollout's sampling temperature
    chunk_tokens: int
    bound: ISBoundConfig
    normalizer: LossNormalizer  # POPO's policy-loss normaliser
    similarity_beta: float  # POPO: 0 when the twin is off
    eps_low: float  # GRPO
    eps_high: float  # GRPO
    kl_beta: float  # GRPO
    tis_cap: float | None  # rollout correction: truncated IS weight cap (None: no correction)

    @classmethod
    def from_config(cls, cfg: DictConfig, vocab_size: int, temperature: float | None = None) -> LossSettings:
        """The settings of `cfg` (its defaults are the schema's); `temperature` defaults to the rollout's."""
        popo = cfg.popo
        return cls(
            algorithm=cfg.algorithm,
            vocab_size=vocab_size,
            temperature=cfg.rollout.temperature if temperature is None else temperature,
            chunk_tokens=cfg.loss.logprob_chunk_tokens,
            bound=OmegaConf.to_object(popo.is_bound),
            normalizer=popo.loss_normalizer,
            similarity_beta=popo.similarity.beta if popo.twin.enabled else 0.0,
            eps_low=cfg.grpo.eps_low,
            eps_high=cfg.grpo.eps_high,
            kl_beta=cfg.grpo.kl_beta,
            tis_cap=popo.tis_cap if popo.rollout_correction == RolloutCorrection.tis else None,
        )

    @property
    def uses_twin_hidden(self) -> bool:
        return self.algorithm == Algorithm.popo and self.similarity_beta > 0

    def logprobs(
        self, logits: torch.Tensor, batch: PolicyBatch, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the batch's target tokens from this rank's vocab-parallel logits."""
        return vocab_parallel_logprobs(
            logits,
            batch.targets,
            self.vocab_size,
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
        )


@dataclass(frozen=True)
class Normalizers:
    # POPO: sum_i w_i |o_i| over rollouts with w_i > 0 (positive_tokens) or the response tokens of every
    # rollout (all_tokens); GRPO: the number of response tokens
    policy: float
    similarity: float  # POPO: number of response tokens of positive rollouts


def loss_normalizers(
    batch: PolicyBatch,
    settings: LossSettings,
    all_response_tokens: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> Normalizers:
    """The global normalisers: this rank's sums, all-reduced over `group` (default: the data-parallel group).

    all_response_tokens: the global number of response tokens of every rollout this batch stands for, rows
    left out of it included (negatives, GRPO's zero-advantage rows). POPO's `all_tokens` needs it; GRPO's
    token-mean uses it when given (default: this batch's tokens).
    """
    lengths = batch.response_lengths().double()
    popo = settings.algorithm == Algorithm.popo
    if popo:
        policy = (batch.sample_weights.double() * lengths).sum()
        similarity = torch.where(batch.positive, lengths, 0.0).sum()
    else:
        policy = lengths.sum()
        similarity = torch.zeros((), dtype=torch.float64)
    sums = torch.stack([policy, similarity]).to(collective_device())
    if dist.is_initialized():
        from megatron.core import parallel_state

        dist.all_reduce(sums, group=group or parallel_state.get_data_parallel_group())
    policy, similarity = sums.tolist()
    if popo and settings.normalizer == LossNormalizer.all_tokens:
        if all_response_tokens is None:
            raise ValueError("popo.loss_normalizer=all_tokens needs the response tokens of every rollout")
        # A batch without a positive still has no gradient: keep 0 so the caller can skip the update.
        policy = float(all_response_tokens) if policy > 0 else 0.0
    elif not popo and all_response_tokens is not None:
        # Zero-advantage rows left out still count; a step on zero gradients is kept (Adam's moments move).
        policy = float(all_response_tokens)
    return Normalizers(policy=policy, similarity=similarity)


@dataclass
class ForwardOutput:
    """One micro-batch's results on the last pipeline stage (None: not asked for)."""

    logprobs: torch.Tensor | None = None  # [mb, S] float32
    entropy: torch.Tensor | None = None  # [mb, S] float32
    hidden: torch.Tensor | None = None  # [S_local, mb, H]: final-norm output (see algo.hidden)


# (index, the micro-batch on the model's device, this rank's logits, the final hidden states or None)
LossOfMicroBatch = Callable[[int, PolicyBatch, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]


def _run_schedule(
    model: torch.nn.Module,
    micro_batches: list[PolicyBatch],
    loss_of: LossOfMicroBatch,
    capture_hidden: bool,
    forward_only: bool,
) -> list[dict]:
    """Megatron's pipeline schedule over the micro-batches; `loss_of` runs on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mb_size, seq = micro_batches[0].tokens.shape
    device = next(model.parameters()).device
    positions = torch.arange(seq, device=device).unsqueeze(0)
    with capture_final_hidden(model) if capture_hidden else nullcontext() as slot:

        def forward_step(data_iterator, chunk):
            index = next(data_iterator)
            mb = micro_batches[index].to(device)
            output = chunk(mb.tokens, positions.expand_as(mb.tokens), None)

            def loss_func(logits):
                return loss_of(index, mb, logits, slot.take() if slot is not None else None)

            return output, loss_func

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(range(len(micro_batches))),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=mb_size,
            forward_only=forward_only,
        )


@torch.no_grad()
def forward_only(
    model: torch.nn.Module,
    micro_batches: list[PolicyBatch],
    settings: LossSettings,
    *,
    logprobs: bool = True,
    entropy: bool = False,
    hidden: bool = False,
) -> list[ForwardOutput]:
    """Per micro-batch outputs on the last pipeline stage; an empty list on the other stages."""

    def loss_of(index, mb, logits, final_hidden):
        out = ForwardOutput(hidden=final_hidden.detach() if hidden else None)
        if logprobs or entropy:
            lp, ent = settings.logprobs(logits, mb, with_entropy=entropy)
            out.logprobs = lp if logprobs else None
            out.entropy = ent
        return logits.new_zeros(()), {"output": out}

    results = _run_schedule(model, micro_batches, loss_of, capture_hidden=hidden, forward_only=True)
    return [r["output"] for r in results]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[PolicyBatch],
    settings: LossSettings,
    normalizers: Normalizers,
    twin_hidden: list[torch.Tensor] | None = None,
    predictor: torch.nn.Module | None = None,
) -> MetricAccumulator:
    """Forward and backward of the step's loss over `micro_batches` (gradients accumulate in the model's
    grad buffers; the optimiser step is the caller's). Returns this rank's metric sums (last stage).

    On the last pipeline stage the micro-batches must carry old_logprobs (and rollout_logprobs for TIS,
    ref_logprobs for GRPO's KL) and, when the similarity penalty is on, `twin_hidden` holds the twin's
    final hidden states of each micro-batch (`forward_only(..., hidden=True)` with the twin swapped in).
    """
    from megatron.core import parallel_state, tensor_parallel

    metrics = MetricAccumulator()
    popo = settings.algorithm == Algorithm.popo
    use_twin = settings.uses_twin_hidden
    if use_twin and parallel_state.is_pipeline_last_stage():
        if twin_hidden is None or len(twin_hidden) != len(micro_batches):
            raise ValueError("POPO's similarity penalty needs the twin's hidden states of every micro-batch")
    # Megatron divides each micro-batch loss by their number, and DDP averages over data-parallel ranks.
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    sequence_parallel = unwrap_model(model).config.sequence_parallel

    def loss_of(index, mb, logits, final_hidden):
        mask = mb.loss_mask
        lp, ent = settings.logprobs(logits, mb, with_entropy=True)
        metrics.add_masked(m.ENTROPY, ent, mask)
        if mb.old_logprobs is None:
            raise ValueError("the batch has no old_logprobs (fill them from the trainer or the rollout engine)")
        if not popo and settings.kl_beta > 0 and mb.ref_logprobs is None:
            raise ValueError("grpo.kl_beta > 0 needs the reference policy's log-probs in the batch (ref_logprobs)")
        if mb.rollout_logprobs is not None:  # the trainer's pi_old against the engine's: numerical mismatch
            mismatch = (mb.old_logprobs - mb.rollout_logprobs).abs()
            metrics.add_masked(m.LOGPROB_MISMATCH, mismatch, mask)
            metrics.add_max(m.LOGPROB_MISMATCH_MAX, torch.where(mask, mismatch, 0.0).max())
        token_weights = None
        if settings.tis_cap is not None:
            if mb.rollout_logprobs is None:
                raise ValueError("popo.rollout_correction=tis needs the engine's log-probs in the batch")
            token_weights = torch.where(
                mask, truncated_is_weights(mb.old_logprobs, mb.rollout_logprobs, settings.tis_cap), 1.0
            )
            metrics.add_masked(m.TIS_WEIGHT, token_weights, mask)
        if popo:
            loss = popo_policy_loss(
                lp, mb.old_logprobs, mask, mb.sample_weights, settings.bound, normalizers.policy, token_weights, metrics
            )
        else:
            loss = grpo_policy_loss(
                lp,
                mb.old_logprobs,
                mask,
                mb.sample_weights,
                settings.eps_low,
                settings.eps_high,
                normalizers.policy,
                mb.ref_logprobs,
                settings.kl_beta,
                token_weights,
                metrics,
            )
        # Loss metrics: the mean over the mini-batches of a step of each mini-batch's global loss (the shares
        # of all micro-batches and ranks carry weights that add up to 1 per mini-batch).
        share = 1.0 / scale
        metrics.add_mean(m.LOSS_POLICY, loss.detach(), share)
        if use_twin:
            sim_mask = (mask & mb.positive.unsqueeze(-1)).transpose(0, 1)  # [S, mb], like the hidden states
            local_mask = sim_mask[sequence_slice(model, sim_mask.shape[0])]
            distance = similarity_sum(final_hidden, twin_hidden[index], local_mask, predictor)
            if sequence_parallel:
                # Each TP rank holds its own slice of the sequence: sum the slices (backward: identity,
                # so each slice's hidden states get the gradient of the whole sum).
                distance = tensor_parallel.reduce_from_tensor_model_parallel_region(distance)
            metrics.add_mean(m.POPO_SIMILARITY, distance.detach(), sim_mask.sum())
            similarity = distance / safe_denominator(normalizers.similarity)
            loss = loss + settings.similarity_beta * similarity
        metrics.add_mean(m.LOSS_TOTAL, loss.detach(), share)
        return loss * scale, {}

    _run_schedule(model, micro_batches, loss_of, capture_hidden=use_twin, forward_only=False)
    return metrics
