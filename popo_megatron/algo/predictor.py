"""The optional predictor head g of the similarity penalty (`popo.similarity.predictor: linear`).

BYOL / SimSiam put a small trainable head on the online side only:
d_t = 1 - cos(g(h_t), stopgrad(h_twin_t)). Here g is one fp32 h x h linear
layer, initialised to the identity (so it starts as the identity predictor),
replicated on every rank of the last pipeline stage.

It is deliberately not part of the Megatron model: the weight mapping, the
exporters and the weight sync to the rollout engine see only the policy. So
it carries its own gradient reduction and Adam step:

- the loss step scales each micro-batch loss by (micro-batches x DP) so that
  Megatron's averaging yields the global batch's gradient (algo/step.py); the
  predictor's gradient is therefore averaged over data-parallel ranks too;
- with sequence parallelism each tensor-parallel rank sees its own slice of
  the sequence, so the gradient is first summed over tensor-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.platform import collective_device


class SimilarityPredictor(torch.nn.Module):
    def __init__(self, hidden_size: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size, dtype=torch.float32, device=collective_device())
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float())

    def finish_grad_sync(self) -> None:
        """Reduce the gradients over model-parallel and data-parallel ranks (call after forward_backward)."""
        from megatron.core import parallel_state

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.sequence_parallel:
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
            flat /= dp
        offset = 0
        for param in self.parameters():
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    @staticmethod
    def is_main_replica() -> bool:
        """Tensor- and data-parallel rank 0 (of the last stage, where the predictor lives) writes it."""
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0

    def sharded_state_dict(self, prefix: str = "predictor.") -> dict:
        """Replicated tensors, written by the main replica."""
        from megatron.core.dist_checkpointing import ShardedTensor

        replica = 0 if self.is_main_replica() else 1
        return {
            prefix + name: ShardedTensor.from_rank_offsets(prefix + name, param.detach(), replica_id=replica)
            for name, param in self.named_parameters()
        }


def build_predictor_optimizer(predictor: SimilarityPredictor, cfg: DictConfig) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay: the policy's hyper-parameters, the predictor's own learning rate
    (`popo.similarity.predictor_lr`; the trainer scales it with the policy's LR schedule)."""
    optim = cfg.optim
    return torch.optim.AdamW(
        predictor.parameters(),
        lr=cfg.popo.similarity.predictor_lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_eps,
        weight_decay=optim.weight_decay,
    )


@torch.no_grad()
def clip_with_predictor(optimizer, ddp, predictor: SimilarityPredictor | None, clip_grad: float) -> float:
    """Clip the policy's and the predictor's gradients together, by their joint norm; returns that norm
    (before clipping). Collective over the model-parallel group: every rank calls it, the predictor
    (after `finish_grad_sync`) is on the last pipeline stage only.

    Megatron's optimiser clips the model's gradients by the model's norm alone. So the joint norm is
    computed first (the optimiser's own norm, plus the predictor's), both gradients are scaled down by
    clip / norm, and the optimiser's step then finds a norm under `clip_grad` and clips no further.
    The model's gradients are scaled in the DDP buffers, from which the optimiser's step copies them.
    """
    from megatron.core import parallel_state

    optimizer.prepare_grads()  # the main gradients the norm is computed from (the step prepares them again)
    model_norm = float(optimizer.get_grad_norm())
    local = torch.zeros((), dtype=torch.float64, device=collective_device())
    if predictor is not None:
        local += sum(p.grad.double().pow(2).sum() for p in predictor.parameters()).to(local.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    joint = (model_norm**2 + float(local)) ** 0.5
    coefficient = clip_grad / (joint + 1.0e-6)  # Megatron's own formula
    if clip_grad > 0 and coefficient < 1.0:
        ddp.scale_gradients(coefficient)
        if predictor is not None:
            for param in predictor.parameters():
                param.grad.mul_(coefficient)
    return joint
