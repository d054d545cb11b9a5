"""The final-norm output of the model, taken from the same forward that produces the logits, and its
mean over each response (the paper's pooled features).

A forward hook on the decoder's final norm (last pipeline stage) keeps its
output, with its autograd history, until the loss of that micro-batch reads
it. Its layout is Megatron's [sequence, batch, hidden]; with sequence
parallelism each tensor-parallel rank holds its own contiguous slice of the
sequence (`sequence_slice`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from popo_megatron.model.forward import unwrap_model

if TYPE_CHECKING:
    from popo_megatron.algo.batch import PolicyBatch


class HiddenSlot:
    """Holds the last captured final-norm output until it is taken."""

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None

    def put(self, value: torch.Tensor) -> None:
        self._value = value

    def take(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError("no final hidden state was captured for this micro-batch")
        value, self._value = self._value, None
        return value


@contextmanager
def capture_final_hidden(model: torch.nn.Module) -> Iterator[HiddenSlot | None]:
    """Capture the final norm's output of every forward while active; None on stages without the final norm."""
    decoder = getattr(unwrap_model(model), "decoder", None)
    norm = getattr(decoder, "final_layernorm", None)
    if norm is None:
        yield None
        return
    slot = HiddenSlot()
    handle = norm.register_forward_hook(lambda _module, _inputs, output: slot.put(output))
    try:
        yield slot
    finally:
        handle.remove()


def sequence_slice(sequence_parallel: bool, seq_len: int) -> slice:
    """The positions of a [seq, ...] activation this rank holds (all of them without sequence parallelism)."""
    from megatron.core import parallel_state

    if not sequence_parallel:
        return slice(0, seq_len)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    local = seq_len // tp
    return slice(rank * local, (rank + 1) * local)


def held_columns(batch: "PolicyBatch", sequence_parallel: bool) -> torch.Tensor:
    """[S_local] int64: the positions of the batch's [P, T] columns that this rank's final hidden states
    [S_local, P, H] hold, in their order: this CP rank's share of each packed sequence
    (model/context_parallel.py), then, with sequence parallelism, this TP rank's contiguous slice of it."""
    from popo_megatron.model.context_parallel import held_positions

    held = held_positions(batch.pack_bounds()) if batch.layout is not None else None
    if held is None:
        held = torch.arange(batch.tokens.shape[1])
    return held[sequence_slice(sequence_parallel, len(held))]


def pooled_features(hidden: torch.Tensor, batch: "PolicyBatch", sequence_parallel: bool) -> torch.Tensor:
    """[N, H] fp32: each sequence's mean of the final hidden states [S_local, P, H] over its response
    positions (`batch.response_positions()`; a pack holds several sequences, a padded row one).

    Under sequence or context parallelism each rank sums the positions it holds (`held_columns`) and the
    partial sums are all-reduced: over TP with the identity as backward (each slice gets the gradient of the
    whole mean), over CP by model/context_parallel's convention; the result is the same on every TP and CP
    rank. A sequence without positions pools to 0."""
    from megatron.core import tensor_parallel

    from popo_megatron.model.context_parallel import sum_over_context_parallel

    positions = batch.response_positions()
    here = held_columns(batch, sequence_parallel)
    local = positions.transpose(0, 1)[here].to(hidden.device)  # [S_local, P]
    if batch.layout is None:
        total = torch.einsum("sb,sbh->bh", local.float(), hidden.float())
    else:
        index = batch.layout.index.transpose(0, 1)[here].to(hidden.device)
        chosen = local & (index >= 0)
        total = torch.zeros(batch.size, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        total = total.index_add(0, index[chosen], hidden[chosen].float())
    if sequence_parallel:
        total = tensor_parallel.reduce_from_tensor_model_parallel_region(total)
    total = sum_over_context_parallel(total)
    counts = batch.per_sequence_sum(positions).to(total.device)
    return total / counts.unsqueeze(-1).clamp(min=1).to(total.dtype)
