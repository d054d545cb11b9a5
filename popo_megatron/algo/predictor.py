"""The similarity term's predictor heads: small trainable modules on the online side only (BYOL / SimSiam).

- `MLPPredictor`, the paper's h_phi on the mean-pooled features: [Linear -> LayerNorm -> ReLU] x (L - 1)
  -> Linear, hidden size in and out, Xavier-uniform weights and zero biases, drawn from the run's seed (the
  same on every rank and at every layout).
- `LinearPredictor`, ours for the per-token similarity (`popo.per_token.predictor: linear`): one h x h
  layer initialised to the identity.

A head lives on the last pipeline stage, in fp32, replicated on its tensor- and data-parallel ranks. It is
deliberately not part of the Megatron model: the weight mapping, the exporters and the weight sync to the
rollout engine see only the policy. So it carries its own gradient reduction and AdamW step (the policy's
optimiser settings and LR schedule, clipped together with the policy's gradients):

- the loss step scales each micro-batch loss by (micro-batches x DP) so that Megatron's averaging yields the
  global batch's gradient (algo/step.py); a head's gradient is therefore averaged over data-parallel ranks
  (and context-parallel ones, whose gradients are CP times their share: model/context_parallel.py);
- a head applied per token under sequence parallelism sees its rank's slice of the sequence: its gradient
  is first summed over tensor-parallel ranks. The pooled head needs no such sum: it reads features that are
  already all-reduced (algo/hidden.pooled_features), so every tensor-parallel rank has the whole gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from popo_megatron.platform import collective_device


class ReplicatedHead(torch.nn.Module):
    """A module replicated on the ranks of the last pipeline stage, trained beside the policy."""

    # Whether each tensor-parallel rank's gradient is a part of the whole (summed over them in the sync).
    tp_partial: bool = False

    def finish_grad_sync(self) -> None:
        """Reduce the gradients over tensor-parallel (when partial) and data-parallel ranks; call after the
        step's forward_backward."""
        from megatron.core import parallel_state

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.tp_partial:
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        # Averaged over data- and context-parallel ranks together, as Megatron's DDP does the policy's
        # (model/context_parallel.py: a CP rank's gradient is CP times its share).
        dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        if dp_cp > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            flat /= dp_cp
        offset = 0
        for param in self.parameters():
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    @staticmethod
    def is_main_replica() -> bool:
        """Tensor-, context- and data-parallel rank 0 (of the last stage, where the head lives) writes it."""
        from megatron.core import parallel_state

        return (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )

    def sharded_state_dict(self, prefix: str = "predictor.") -> dict:
        """Replicated tensors, written by the main replica: they load at any layout."""
        from megatron.core.dist_checkpointing import ShardedTensor

        replica = 0 if self.is_main_replica() else 1
        return {
            prefix + name: ShardedTensor.from_rank_offsets(prefix + name, param.detach(), replica_id=replica)
            for name, param in self.named_parameters()
        }


class MLPPredictor(ReplicatedHead):
    """h_phi: [Linear -> LayerNorm -> ReLU] x (layers - 1) -> Linear, `hidden_size` in and out."""

    def __init__(self, hidden_size: int, width: int, layers: int, seed: int) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"the predictor needs at least 2 layers, got {layers}")
        sizes = [hidden_size] + [width] * (layers - 1) + [hidden_size]
        parts: list[torch.nn.Module] = []
        # Built on the meta device and initialised from its own generator: torch's default initialisation
        # would draw from (and so shift) the process's random stream.
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            parts.append(torch.nn.Linear(n_in, n_out, dtype=torch.float32, device="meta"))
            if i < layers - 1:
                parts += [torch.nn.LayerNorm(n_out, dtype=torch.float32, device="meta"), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*parts).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same weights on every rank
        with torch.no_grad():
            for module in self.net:
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(module.weight, generator=generator)
                    module.bias.zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    module.reset_parameters()  # ones and zeros
        self.to(collective_device())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


class LinearPredictor(ReplicatedHead):
    """One fp32 h x h layer initialised to the identity, applied to each token's hidden state."""

    def __init__(self, hidden_size: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size, dtype=torch.float32, device=collective_device())
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()
        self.tp_partial = sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float())


def build_head_optimizer(head: ReplicatedHead, lr: float, optim_cfg) -> torch.optim.Optimizer:
    """AdamW with the policy's betas, eps and weight decay, at `lr` (the trainer scales it with the policy's
    LR schedule)."""
    return torch.optim.AdamW(
        head.parameters(),
        lr=lr,
        betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
        eps=optim_cfg.adam_eps,
        weight_decay=optim_cfg.weight_decay,
    )


@torch.no_grad()
def clip_with_head(optimizer, head: ReplicatedHead | None, clip_grad: float) -> float:
    """Prepare the optimiser's main gradients, measure the joint norm of the policy's and the head's, and
    clip both by one coefficient, clip / (norm + 1e-6) when below 1 (Megatron's formula). Returns the norm
    before clipping; a non-finite norm scales nothing, so the caller can refuse the update (then call
    `optimizer.step_with_ready_grads()` only for a finite one).

    Megatron's optimiser step clips the model's gradients by the model's norm alone; with a head, that would
    leave the head's share of an update unlike the authors' single optimiser over both. Collective over the
    model-parallel group: every rank calls it, the head (after `finish_grad_sync`) is on the last pipeline
    stage only; without a head (GRPO) the norm is the optimiser's own.
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer.prepare_grads()
    model_norm = float(optimizer.get_grad_norm())
    local = torch.zeros((), dtype=torch.float64, device=collective_device())
    if head is not None:
        local += sum(p.grad.double().pow(2).sum() for p in head.parameters()).to(local.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    joint = (model_norm**2 + float(local)) ** 0.5
    coefficient = clip_grad / (joint + 1.0e-6)
    if not math.isfinite(joint) or clip_grad <= 0 or coefficient >= 1.0:
        return joint
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if params and not getattr(part, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(params, clip_grad, joint)
    if head is not None:
        for param in head.parameters():
            param.grad.mul_(coefficient)
    return joint
