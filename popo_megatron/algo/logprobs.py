"""Log-probabilities and entropy of target tokens from vocab-parallel logits.

Each tensor-parallel rank holds the logits of its slice of the vocabulary,
[tokens, V/TP] (Megatron's output layer with `parallel_output=True`). The
log-softmax needs statistics over the whole vocabulary; gathering the logits
would cost [tokens, V] per rank, and even the local fp32 upcast of a Qwen
vocabulary (151,936) is 4.9 GB at 8k tokens. So:

- the forward walks the tokens in chunks of `chunk_tokens` rows; each chunk
  is upcast to fp32 and reduced to four numbers per token (local max, sum of
  exp, sum of exp * logit, the target's logit when this rank owns it);
- one all-gather of those [4, tokens] statistics over TP combines them
  (log-sum-exp of per-rank partial sums, each rescaled by its own max), so
  there is one collective per call, not per chunk;
- only the input logits and two numbers per token are kept for backward,
  which recomputes the softmax chunk by chunk and writes the gradient of the
  local logits directly (no collective: d log p / d z_v needs only the global
  log-sum-exp, and the output layer's backward sums over TP as usual).

Peak extra memory is a few fp32 chunks, whatever the number of tokens.

Padded vocabulary rows (the model pads the vocabulary for TP) are excluded:
they get probability 0, as in the HF model and in vLLM. `temperature` divides
the logits first, matching the engine's sampled-token log-probs after
temperature. Works on the last pipeline stage with or without sequence
parallelism (the output layer already gathered the sequence).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _chunk_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """An fp32 copy of a chunk of logits divided by the temperature (always a new tensor: callers work in place)."""
    if temperature != 1.0:
        return logits.float().div_(temperature) if logits.dtype != torch.float32 else logits / temperature
    return logits.to(torch.float32, copy=True)


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank [ranks, 4, N] statistics -> (log-sum-exp, target logit, entropy) over the whole vocabulary."""
    local_max, sum_exp, sum_exp_logit, target = stats.unbind(1)
    global_max = local_max.max(0).values
    # A rank without valid columns reports max -inf and sums 0: its scale is 0.
    scale = torch.exp(local_max - global_max)
    total = (scale * sum_exp).sum(0)
    lse = global_max + total.log()
    entropy = lse - (scale * sum_exp_logit).sum(0) / total
    return lse, target.sum(0), entropy


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, valid, temperature, chunk, group, with_entropy):
        n = targets.numel()
        z_all = logits.reshape(n, logits.shape[-1])
        flat_targets = targets.reshape(n)
        stats = torch.zeros(4, n, dtype=torch.float32, device=logits.device)
        stats[0] = float("-inf")
        if valid > 0:
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                z = _chunk_fp32(z_all[rows, :valid], temperature)
                local_max = z.max(dim=-1).values
                exp = torch.exp(z - local_max.unsqueeze(-1))
                stats[0, rows] = local_max
                stats[1, rows] = exp.sum(-1)
                if with_entropy:
                    stats[2, rows] = torch.einsum("nv,nv->n", exp, z)
                local_target = flat_targets[rows] - vocab_start
                mine = (local_target >= 0) & (local_target < valid)
                picked = z.gather(1, local_target.clamp(0, valid - 1).unsqueeze(-1)).squeeze(-1)
                stats[3, rows] = torch.where(mine, picked, 0.0)
                del z, exp
        if group is not None and dist.get_world_size(group) > 1:
            ranks = dist.get_world_size(group)
            gathered = torch.empty(ranks * 4, n, dtype=stats.dtype, device=stats.device)
            dist.all_gather_into_tensor(gathered, stats, group=group)
            gathered = gathered.view(ranks, 4, n)
        else:
            gathered = stats.unsqueeze(0)
        lse, target_logit, entropy = _combine(gathered)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.params = (vocab_start, valid, temperature, chunk, with_entropy)
        logprobs = (target_logit - lse).view(targets.shape)
        if not with_entropy:
            unused = torch.zeros_like(logprobs)
            ctx.mark_non_differentiable(unused)
            return logprobs, unused
        return logprobs, entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        vocab_start, valid, temperature, chunk, with_entropy = ctx.params
        n = targets.numel()
        z_all = logits.reshape(n, logits.shape[-1])
        flat_targets = targets.reshape(n)
        g_lp = grad_logprobs.reshape(n).float()
        g_ent = grad_entropy.reshape(n).float() if with_entropy and grad_entropy is not None else None
        grad = torch.zeros_like(z_all)
        for start in range(0, n if valid > 0 else 0, chunk):
            rows = slice(start, min(start + chunk, n))
            z = _chunk_fp32(z_all[rows, :valid], temperature)
            chunk_lse = lse[rows].unsqueeze(-1)
            probs = torch.exp(z - chunk_lse)
            # d logp_target / dz_v = 1[v = target] - p_v
            # d H / dz_v = -p_v (log p_v + H) = -p_v (z_v - lse + H)
            if g_ent is not None:
                dz = z.sub_(chunk_lse - entropy[rows].unsqueeze(-1)).mul_(g_ent[rows].unsqueeze(-1))
                dz.add_(g_lp[rows].unsqueeze(-1)).mul_(probs).neg_()
            else:
                dz = probs.mul_(-g_lp[rows].unsqueeze(-1))
            local_target = flat_targets[rows] - vocab_start
            mine = (local_target >= 0) & (local_target < valid)
            dz.scatter_add_(
                1, local_target.clamp(0, valid - 1).unsqueeze(-1), torch.where(mine, g_lp[rows], 0.0).unsqueeze(-1)
            )
            if temperature != 1.0:
                dz.div_(temperature)
            grad[rows, :valid] = dz.to(grad.dtype)
            del z, probs, dz
        return grad.view_as(logits), None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] and (optionally) the entropy, per token.

    `logits` [..., V/TP] is this TP rank's vocabulary slice (rank r holds ids
    [r * V/TP, (r + 1) * V/TP)); `targets` [...] holds global token ids;
    `vocab_size` is the real vocabulary (ids at or above it are padding).
    Returns float32 tensors shaped like `targets`, identical on every TP rank,
    differentiable with respect to `logits`. Targets outside the vocabulary
    (e.g. padding positions the caller masks) give finite garbage, not errors.
    """
    from megatron.core import parallel_state

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
    else:
        group, rank = None, 0
    local_vocab = logits.shape[-1]
    vocab_start = rank * local_vocab
    valid = max(0, min(local_vocab, vocab_size - vocab_start))
    logprobs, entropy = _VocabParallelLogProbs.apply(
        logits, targets, vocab_start, valid, float(temperature), int(chunk_tokens), group, with_entropy
    )
    return logprobs, entropy if with_entropy else None
