"""Log-probabilities and entropy of target tokens from vocab-parallel logits.

Each tensor-parallel rank holds the logits of its slice of the vocabulary,
[tokens, V/TP] (Megatron's output layer with `parallel_output=True`). The
log-softmax needs statistics over the whole vocabulary; gathering the logits
would cost [tokens, V] per rank, and even the local fp32 upcast of a Qwen
vocabulary (151,936) is 4.9 GB at 8k tokens. So:

- the forward walks the tokens in chunks of `chunk_tokens` rows; each chunk
  is upcast into a reused fp32 buffer and reduced to four numbers per token
  (local max, sum of exp, sum of exp * shifted logit for the entropy, the
  target's logit when this rank owns it);
- one all-gather of those [4, tokens] statistics over TP combines them
  (log-sum-exp of per-rank partial sums, each rescaled by its own max), so
  there is one collective per call, not per chunk;
- only the input logits and two numbers per token are kept for backward,
  which recomputes the softmax chunk by chunk and writes the gradient of the
  local logits directly (no collective: d log p / d z_v needs only the global
  log-sum-exp, and the output layer's backward sums over TP as usual).

Peak extra memory, whatever the number of tokens: the gradient of the logits
(in their dtype, as any method produces) and one fp32 [chunk, V/TP] buffer
(two with entropy). bench/bench_logprobs.py measures it against the naive
gathered log_softmax.

Padded vocabulary rows (the model pads the vocabulary for TP) are excluded:
they get probability 0, as in the HF model and in vLLM. `temperature` divides
the logits first, matching the engine's sampled-token log-probs after
temperature. Works on the last pipeline stage with or without sequence
parallelism (the output layer already gathered the sequence).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _scratch(rows: int, cols: int, count: int, like: torch.Tensor) -> list[torch.Tensor]:
    """`count` fp32 [rows, cols] buffers reused by every chunk (fresh large allocations each chunk would
    cost page faults on the host and allocator churn on the device)."""
    return [torch.empty(rows, cols, dtype=torch.float32, device=like.device) for _ in range(count)]


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank [ranks, 4, N] statistics -> (log-sum-exp, target logit, entropy) over the whole vocabulary.

    Rank r reports, relative to its own max M_r of z/T: S_r = sum exp(z/T - M_r) and
    Q_r = sum exp(z/T - M_r) (z/T - M_r). With M the global max and scale_r = exp(M_r - M):
    lse = M + log sum_r scale_r S_r, and H = lse - E_p[z/T] = log S - sum_r scale_r (Q_r + (M_r - M) S_r) / S.
    """
    local_max, sum_exp, sum_shifted, target = stats.unbind(1)
    global_max = local_max.max(0).values
    offset = local_max - global_max
    # A rank without valid columns reports max -inf and sums 0: its scale is 0 and it adds nothing.
    scale = torch.exp(offset)
    total = (scale * sum_exp).sum(0)
    spread = torch.where(sum_exp > 0, scale * (sum_shifted + offset * sum_exp), 0.0).sum(0)
    entropy = total.log() - spread / total
    return global_max + total.log(), target.sum(0), entropy


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, valid, temperature, chunk, group, with_entropy):
        ctx.set_materialize_grads(False)
        n = targets.numel()
        z_all = logits.reshape(n, logits.shape[-1])
        flat_targets = targets.reshape(n)
        stats = torch.zeros(4, n, dtype=torch.float32, device=logits.device)
        stats[0] = float("-inf")
        buffers = _scratch(min(chunk, n), valid, 2 if with_entropy else 1, logits) if valid > 0 else []
        for start in range(0, n if valid > 0 else 0, chunk):
            rows = slice(start, min(start + chunk, n))
            z = z_all[rows, :valid]
            shifted = buffers[0][: z.shape[0]].copy_(z)  # fp32
            local_max = shifted.max(dim=-1).values
            shifted.sub_(local_max.unsqueeze(-1))
            if temperature != 1.0:
                shifted.mul_(1.0 / temperature)  # z/T - M_r, M_r = max(z)/T
            exp = torch.exp(shifted, out=buffers[1][: z.shape[0]]) if with_entropy else shifted.exp_()
            stats[0, rows] = local_max / temperature
            stats[1, rows] = exp.sum(-1)
            if with_entropy:
                stats[2, rows] = torch.einsum("nv,nv->n", exp, shifted)
            local_target = flat_targets[rows] - vocab_start
            mine = (local_target >= 0) & (local_target < valid)
            picked = z.gather(1, local_target.clamp(0, valid - 1).unsqueeze(-1)).squeeze(-1).float() / temperature
            stats[3, rows] = torch.where(mine, picked, 0.0)
        del buffers
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
        zeros = torch.zeros(n, dtype=torch.float32, device=logits.device)
        g_lp = zeros if grad_logprobs is None else grad_logprobs.reshape(n).float()
        g_ent = grad_entropy.reshape(n).float() if with_entropy and grad_entropy is not None else None
        grad = torch.empty_like(z_all)
        grad[:, valid:].zero_()  # padded vocabulary rows
        buffers = _scratch(min(chunk, n), valid, 2 if g_ent is not None else 1, logits) if valid > 0 else []
        for start in range(0, n if valid > 0 else 0, chunk):
            rows = slice(start, min(start + chunk, n))
            z = z_all[rows, :valid]
            log_p = buffers[0][: z.shape[0]].copy_(z)
            if temperature != 1.0:
                log_p.mul_(1.0 / temperature)
            log_p.sub_(lse[rows].unsqueeze(-1))  # z/T - lse
            # d logp_target / dz_v = (1[v = target] - p_v) / T
            # d H / dz_v = -p_v (log p_v + H) / T
            if g_ent is not None:
                probs = torch.exp(log_p, out=buffers[1][: z.shape[0]])
                dz = log_p.add_(entropy[rows].unsqueeze(-1)).mul_(g_ent[rows].unsqueeze(-1))
                dz.add_(g_lp[rows].unsqueeze(-1)).mul_(probs).neg_()
            else:
                dz = log_p.exp_().mul_(-g_lp[rows].unsqueeze(-1))
            local_target = flat_targets[rows] - vocab_start
            mine = (local_target >= 0) & (local_target < valid)
            dz.scatter_add_(
                1, local_target.clamp(0, valid - 1).unsqueeze(-1), torch.where(mine, g_lp[rows], 0.0).unsqueeze(-1)
            )
            if temperature != 1.0:
                dz.mul_(1.0 / temperature)
            grad[rows, :valid].copy_(dz)  # casts to the logits' dtype on the way
        del buffers
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
