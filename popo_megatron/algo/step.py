"""Forward passes and the training pass on Megatron-Core's forward_backward_func, for any objective.

Both entry points are collective over the model-parallel world and run with any TP / PP / SP layout and
any number of micro-batches:

- `forward_only`: a no-grad pass giving, on the last pipeline stage, per micro-batch log-probs (and
  entropy) of the target tokens, the final hidden states and/or their mean over each response: pi_old,
  the EMA target's features (with the target swapped in), a reference policy's log-probs.
- `forward_backward`: the training pass. The objective's `loss_of` returns each micro-batch's share of the
  global batch's loss (objectives/); Megatron divides a micro-batch loss by the number of micro-batches
  and DDP averages gradients over data-parallel ranks, so the share is multiplied back by both and the
  gradients are those of the global batch's loss, whatever the split (tested: 1 vs 4 micro-batches, DP=1
  vs DP=2).

`Forwards` is the trainer's way of running `forward_only` over a batch: in the update's own micro-batch
shapes (so that pi_old from it makes on-policy ratios exactly 1), or over any subset of rows in padded
micro-batches.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.hidden import capture_final_hidden, pooled_features
from popo_megatron.algo.logprobs import vocab_parallel_logprobs
from popo_megatron.model.forward import unwrap_model


@dataclass(frozen=True)
class LogprobSettings:
    """How log-probs are computed from this rank's vocab-parallel logits."""

    vocab_size: int  # the real vocabulary; padded ids are excluded from the softmax
    temperature: float  # the rollout's sampling temperature: logits are divided by it (TRL's convention)
    chunk_tokens: int

    def logprobs(
        self, logits: torch.Tensor, batch: PolicyBatch, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the batch's target tokens, [B, S] fp32."""
        return vocab_parallel_logprobs(
            logits,
            batch.targets,
            self.vocab_size,
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
        )


@dataclass
class ForwardOutput:
    """One micro-batch's (or, from `Forwards`, a batch's) results on the last pipeline stage (None: not asked
    for)."""

    logprobs: torch.Tensor | None = None  # [mb, S] float32
    entropy: torch.Tensor | None = None  # [mb, S] float32
    hidden: torch.Tensor | None = None  # [S_local, mb, H]: final-norm output (see algo.hidden)
    pooled: torch.Tensor | None = None  # [mb, H] float32: the final-norm output's mean over each response


# (index, the micro-batch on the model's device, this rank's logits, the final hidden states or None) ->
# the micro-batch's share of the global loss
LossOfMicroBatch = Callable[[int, PolicyBatch, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _run_schedule(
    model: torch.nn.Module,
    micro_batches: list[PolicyBatch],
    loss_of: Callable[[int, PolicyBatch, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]],
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
    settings: LogprobSettings,
    *,
    logprobs: bool = True,
    entropy: bool = False,
    hidden: bool = False,
    pooled: bool = False,
) -> list[ForwardOutput]:
    """Per micro-batch outputs on the last pipeline stage; an empty list on the other stages."""
    sequence_parallel = unwrap_model(model).config.sequence_parallel

    def loss_of(index, mb, logits, final_hidden):
        out = ForwardOutput(hidden=final_hidden.detach() if hidden else None)
        if pooled:
            out.pooled = pooled_features(final_hidden, mb.response_positions(), sequence_parallel)
        if logprobs or entropy:
            lp, ent = settings.logprobs(logits, mb, with_entropy=entropy)
            out.logprobs = lp if logprobs else None
            out.entropy = ent
        return logits.new_zeros(()), {"output": out}

    results = _run_schedule(model, micro_batches, loss_of, capture_hidden=hidden or pooled, forward_only=True)
    return [r["output"] for r in results]


def forward_backward(
    model: torch.nn.Module, micro_batches: list[PolicyBatch], loss_of: LossOfMicroBatch, capture_hidden: bool
) -> None:
    """Forward and backward of the step's loss over `micro_batches`: `loss_of` gives each micro-batch's share
    of the global loss on the last stage. Gradients accumulate in the model's grad buffers (and in any head
    the loss uses); the optimiser step is the caller's."""
    from megatron.core import parallel_state

    # Megatron divides each micro-batch loss by their number, and DDP averages over data-parallel ranks.
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()

    def scaled(index, mb, logits, final_hidden):
        return loss_of(index, mb, logits, final_hidden) * scale, {}

    _run_schedule(model, micro_batches, scaled, capture_hidden=capture_hidden, forward_only=False)


def _concat(parts: list[torch.Tensor | None], rows: int) -> torch.Tensor | None:
    return None if not parts or parts[0] is None else torch.cat(parts)[:rows]


class Forwards:
    """`forward_only` over a whole batch with the trainer's micro-batching (collective like forward_only)."""

    def __init__(self, model: torch.nn.Module, settings: LogprobSettings, micro_batch_size: int) -> None:
        self.model = model
        self.settings = settings
        self.micro_batch_size = micro_batch_size

    def micro_batches(self, mini: PolicyBatch) -> list[PolicyBatch]:
        """The update's micro-batches of a mini-batch (trainer/batching.rank_rows sizes the mini-batches to a
        whole number of them, or to one smaller one)."""
        return mini.micro_batches(max(1, mini.size // self.micro_batch_size))

    def in_update_shapes(self, batch: PolicyBatch, mini_batches: int, **wanted: bool) -> list[ForwardOutput]:
        """Per micro-batch outputs in the update's own shapes (the batch's `mini_batches` slices, each cut
        like `micro_batches`): the same kernels as the training pass see."""
        micro = [mb for mini in batch.micro_batches(mini_batches) for mb in self.micro_batches(mini)]
        return forward_only(self.model, micro, self.settings, **wanted)

    def rows(self, batch: PolicyBatch, **wanted: bool) -> ForwardOutput:
        """The outputs of every row of `batch` (any number of rows, forwarded in padded micro-batches),
        concatenated; hidden states are not available this way. Last stage only (None elsewhere)."""
        if wanted.get("hidden"):
            raise ValueError("per-token hidden states come in the update's micro-batches (in_update_shapes)")
        if batch.size == 0:
            return ForwardOutput()
        outputs = forward_only(self.model, batch.padded_micro_batches(self.micro_batch_size), self.settings, **wanted)
        if not outputs:
            return ForwardOutput()
        return ForwardOutput(
            logprobs=_concat([o.logprobs for o in outputs], batch.size),
            entropy=_concat([o.entropy for o in outputs], batch.size),
            pooled=_concat([o.pooled for o in outputs], batch.size),
        )


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
