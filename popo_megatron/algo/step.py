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
shapes (so that pi_old from it makes on-policy ratios exactly 1), or over any subset of rows. Its
micro-batches are `train.micro_batch_size` padded rows, or, with `train.max_tokens_per_microbatch`, packs
of whole sequences within that token budget (algo/packing.py), as many on every data-parallel rank.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from popo_megatron.algo.batch import PolicyBatch
from popo_megatron.algo.hidden import capture_final_hidden, pooled_features
from popo_megatron.algo.logprobs import vocab_parallel_logprobs
from popo_megatron.algo.packing import pack_by_tokens, split_into, thd_params
from popo_megatron.model.context_parallel import context_parallel_size, gather_over_context_parallel, held_positions
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
        """Log-probs (and entropy) of the batch's target tokens, [B, S] fp32. Under context parallelism
        `logits` are this rank's positions of the pack; the result is gathered over the CP ranks, so the
        objectives see the whole pack."""
        targets = batch.targets
        bounds = batch.pack_bounds() if batch.layout is not None else None
        held = held_positions(bounds) if bounds is not None else None
        if held is not None:
            targets = targets[:, held.to(targets.device)]
        logprobs, entropy = vocab_parallel_logprobs(
            logits,
            targets,
            self.vocab_size,
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
        )
        if held is not None:
            logprobs = gather_over_context_parallel(logprobs, 1, bounds)
            entropy = None if entropy is None else gather_over_context_parallel(entropy, 1, bounds)
        return logprobs, entropy


@dataclass
class ForwardOutput:
    """One micro-batch's (or, from `Forwards`, a batch's) results on the last pipeline stage (None: not asked
    for)."""

    logprobs: torch.Tensor | None = None  # [P, T] float32
    entropy: torch.Tensor | None = None  # [P, T] float32
    hidden: torch.Tensor | None = None  # [T_local, P, H]: final-norm output (see algo.hidden)
    pooled: torch.Tensor | None = None  # [N, H] float32: the final-norm output's mean over each response


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
    with capture_final_hidden(model) if capture_hidden else nullcontext() as slot:

        def forward_step(data_iterator, chunk):
            index = next(data_iterator)
            mb = micro_batches[index].to(device)
            output = forward_micro_batch(chunk, mb)

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


def forward_micro_batch(chunk: torch.nn.Module, mb: PolicyBatch) -> torch.Tensor:
    """The model (stage) on one micro-batch: padded rows causally, or one pack in Megatron's THD layout with
    its sequences' boundaries, so that each sequence attends within itself and RoPE restarts at each
    (Transformer Engine's attention on GPU, model/packed_attention.py with the local spec). Under context
    parallelism the model gets this rank's share of each sequence (model/context_parallel.py) with the whole
    pack's boundaries, as Megatron's THD attention and RoPE expect."""
    from megatron.core import parallel_state

    if mb.layout is None:
        if context_parallel_size() > 1:
            raise ValueError("context parallelism runs packed micro-batches (train.max_tokens_per_microbatch)")
        return chunk(mb.tokens, mb.positions(), None)
    bounds = mb.pack_bounds()
    params = thd_params(bounds)
    for name in ("cu_seqlens_q", "cu_seqlens_kv"):
        setattr(params, name, getattr(params, name).to(mb.tokens.device))
    tokens, positions = mb.tokens, mb.positions()
    held = held_positions(bounds)
    if held is not None:
        params.cp_group = parallel_state.get_context_parallel_group()
        held = held.to(tokens.device)
        tokens, positions = tokens[:, held], positions[:, held]
    return chunk(tokens, positions, None, packed_seq_params=params)


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
            out.pooled = pooled_features(final_hidden, mb, sequence_parallel)
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
    # Under context parallelism Megatron also multiplies the loss by CP (its convention: a CP rank's loss is
    # its own tokens' share), while ours is the whole loss on every CP rank, whose gathers already sum the
    # ranks' gradients (model/context_parallel.py): the CP factor is taken back out.
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size() / context_parallel_size()

    def scaled(index, mb, logits, final_hidden):
        return loss_of(index, mb, logits, final_hidden) * scale, {}

    _run_schedule(model, micro_batches, scaled, capture_hidden=capture_hidden, forward_only=False)


def as_rows(
    micro_batches: list[PolicyBatch], outputs: list[ForwardOutput], rows: int, width: int, first_rows: list[int]
) -> ForwardOutput:
    """Per-micro-batch `outputs` as one output over `rows` padded rows of `width` positions: micro-batch i's
    sequences are rows from `first_rows[i]` on (padded micro-batches are consecutive slices; a pack's
    sequences go back to their rows). Rows no micro-batch holds are 0. Hidden states stay per micro-batch."""
    if not outputs:
        return ForwardOutput()
    merged = {}
    for name in ("logprobs", "entropy", "pooled"):
        parts = [getattr(o, name) for o in outputs]
        if parts[0] is None:
            merged[name] = None
            continue
        device = parts[0].device
        shape = (rows, *parts[0].shape[1:]) if name == "pooled" else (rows, width)
        out = torch.zeros(shape, dtype=parts[0].dtype, device=device)
        for mb, part, first in zip(micro_batches, parts, first_rows, strict=True):
            if mb.layout is None:
                count = min(part.shape[0], rows - first)
                out[first : first + count, : part.shape[1]] = part[:count]
            elif name == "pooled":
                out[first + mb.layout.origin.to(device)] = part
            else:
                out[first : first + _source_rows(mb)] += mb.unpacked(part, _source_rows(mb), width)
        merged[name] = out
    return ForwardOutput(**merged)


def _source_rows(mb: PolicyBatch) -> int:
    return int(mb.layout.origin.max()) + 1 if mb.size else 0


def first_rows_of(micro_batches: list[PolicyBatch]) -> list[int]:
    """Each of one mini-batch's micro-batches' first row in it: padded ones are consecutive slices, a pack's
    layout names rows of the whole mini-batch."""
    firsts, row = [], 0
    for mb in micro_batches:
        firsts.append(0 if mb.layout is not None else row)
        row += 0 if mb.layout is not None else mb.size
    return firsts


class Forwards:
    """`forward_only` over a whole batch with the trainer's micro-batching (collective like forward_only).
    With `max_tokens` micro-batches are packs of at most that many tokens, else `micro_batch_size` rows."""

    def __init__(
        self, model: torch.nn.Module, settings: LogprobSettings, micro_batch_size: int, max_tokens: int | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens

    def micro_batches(self, mini: PolicyBatch) -> list[PolicyBatch]:
        """The update's micro-batches of a mini-batch: consecutive slices of `micro_batch_size` rows
        (trainer/batching.rank_rows sizes the mini-batches to a whole number of them, or to one smaller one),
        or packs of its rows, as many on every data-parallel rank (collective over the data-parallel group:
        Megatron's schedules, and expert parallelism's all-to-all, need equal counts)."""
        if self.max_tokens is None:
            return mini.micro_batches(max(1, mini.size // self.micro_batch_size))
        packs = self._packs(mini)
        lengths = mini.row_lengths(_sequence_multiple()).tolist()
        return self._packed(mini, split_into(packs, lengths, _most_over_dp(max(1, len(packs)))))

    def _packs(self, batch: PolicyBatch) -> list[list[int]]:
        lengths = batch.row_lengths(_sequence_multiple()).tolist()
        used = [i for i, n in enumerate(lengths) if n > 0]  # a row without a loss token needs no pass
        return [[used[j] for j in pack] for pack in pack_by_tokens([lengths[i] for i in used], self.max_tokens)]

    def _packed(self, batch: PolicyBatch, packs: list[list[int]]) -> list[PolicyBatch]:
        """One micro-batch per pack, each as wide as the widest (the budget with pipeline parallelism, whose
        stages exchange fixed shapes), rounded up so that each CP rank's share divides over TP with
        sequence parallelism."""
        from megatron.core import parallel_state

        cp = context_parallel_size()
        lengths = batch.row_lengths(_sequence_multiple()).tolist()
        sequence_parallel = unwrap_model(self.model).config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        multiple = math.lcm(_sequence_multiple(), cp * tp)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            width = self.max_tokens
        else:
            width = max([sum(lengths[i] for i in pack) for pack in packs] + [1])
        width = -(-width // multiple) * multiple
        return [batch.packed([pack], width, _sequence_multiple()) for pack in packs]

    def update_micro_batches(self, batch: PolicyBatch, mini_batches: int) -> tuple[list[PolicyBatch], list[int]]:
        """The update's micro-batches of all of the batch's `mini_batches` slices, and each one's first row in
        the batch (collective, as `micro_batches`)."""
        micro, first_rows = [], []
        for k, mini in enumerate(batch.micro_batches(mini_batches)):
            mine = self.micro_batches(mini)
            micro += mine
            first_rows += [k * mini.size + first for first in first_rows_of(mine)]
        return micro, first_rows

    def run(self, micro_batches: list[PolicyBatch], **wanted: bool) -> list[ForwardOutput]:
        return forward_only(self.model, micro_batches, self.settings, **wanted)

    def in_update_rows(self, batch: PolicyBatch, mini_batches: int, **wanted: bool) -> ForwardOutput:
        """The outputs of every row of `batch`, forwarded in the update's own shapes (its `mini_batches`
        slices, each cut like `micro_batches`: the same kernels as the training pass see), over its rows
        (last stage; empty elsewhere)."""
        micro, first_rows = self.update_micro_batches(batch, mini_batches)
        return as_rows(micro, self.run(micro, **wanted), batch.size, batch.tokens.shape[1], first_rows)

    def rows(self, batch: PolicyBatch, **wanted: bool) -> ForwardOutput:
        """The outputs of every row of `batch` (any number of rows, in padded micro-batches or packs),
        over its rows; hidden states are not available this way. Last stage only (empty elsewhere)."""
        if wanted.get("hidden"):
            raise ValueError("per-token hidden states come per micro-batch of the update (Forwards.run)")
        if batch.size == 0:
            return ForwardOutput()
        if self.max_tokens is None:
            micro = batch.padded_micro_batches(self.micro_batch_size)
            first_rows = [i * micro[0].size for i in range(len(micro))]
        else:
            micro = self._packed(batch, self._packs(batch) or [[]])
            first_rows = [0] * len(micro)
        return as_rows(micro, self.run(micro, **wanted), batch.size, batch.tokens.shape[1], first_rows)


def _sequence_multiple() -> int:
    """What a packed sequence's length is rounded up to: 2 x CP under context parallelism (each CP rank
    holds two equal chunks of it), else 1."""
    cp = context_parallel_size()
    return 2 * cp if cp > 1 else 1


def _most_over_dp(count: int) -> int:
    """The largest `count` of any data-parallel rank (collective over the data-parallel group)."""
    from megatron.core import parallel_state

    from popo_megatron.platform import collective_device

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return count
    most = torch.tensor([count], dtype=torch.long, device=collective_device())
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return int(most.item())


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
