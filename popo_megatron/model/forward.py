"""Run a Megatron GPTModel over a batch of token ids with Megatron's pipeline schedules."""

from __future__ import annotations

from typing import Callable

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., V/TP] into [..., V] on every TP rank."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def forward_logits(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_microbatches: int = 1,
) -> list[torch.Tensor]:
    """Forward `tokens` [batch, seq] through all pipeline stages, split into
    micro-batches; backward too when `loss_fn` is given.

    `loss_fn` maps this TP rank's vocab-parallel logits [mb, seq, V/TP] of one
    micro-batch to a scalar loss (averaged over micro-batches by the caller's
    choice of loss; Megatron divides by num_microbatches). Returns, on the last
    pipeline stage, the full-vocab logits of each micro-batch on the model's device (empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    if batch % num_microbatches:
        raise ValueError(f"batch {batch} is not divisible into {num_microbatches} micro-batches")
    device = next(model.parameters()).device  # the tokens may come from the CPU (a data loader, a test)
    micro = list(tokens.to(device).chunk(num_microbatches))
    positions = torch.arange(seq, device=device).unsqueeze(0)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(mb, positions.expand_as(mb), None)

        def reduce(logits):
            loss = loss_fn(logits) if loss_fn is not None else logits.new_zeros(())
            return loss, {"logits": gather_vocab(logits).detach()}

        return output, reduce

    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=batch // num_microbatches,
        forward_only=loss_fn is None,
    )
    return [r["logits"] for r in results]
