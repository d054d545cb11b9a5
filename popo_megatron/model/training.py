"""Wrap a built model for training: Megatron DDP and the Megatron optimiser, from the config.

Gradients are reduced in fp32 and averaged over data-parallel ranks (the loss
step in popo_megatron.algo.step relies on that averaging); with
`optim.use_distributed_optimizer` the optimiser state is sliced across
data-parallel ranks (ZeRO-1) and updated parameters are all-gathered
synchronously at the end of every step, so the model is whole between steps.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from popo_megatron.config.schema import setting_value
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.model.kv_replication import make_finalize_grads_func
from popo_megatron.model.layout import kv_replication_factor


def wrap_ddp(model: torch.nn.Module, args: HFModelArgs, cfg: DictConfig) -> torch.nn.Module:
    """Megatron DistributedDataParallel around this rank's model stage."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.config.finalize_model_grads_func = make_finalize_grads_func(
        args.head_dim, kv_replication_factor(args.num_kv_heads, cfg.parallel.tensor_model_parallel_size)
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        bucket_size=cfg.optim.ddp_bucket_size,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model: torch.nn.Module, cfg: DictConfig):
    """Megatron's Adam (decoupled weight decay) over the DDP-wrapped model."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp_model.config
    optim = cfg.optim
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            # Megatron copies both into every parameter group, where the LR schedule reads them: without
            # min_lr there, a decaying schedule (linear, cosine) fails on its first step.
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        [ddp_model],
    )


def build_scheduler(optimizer, cfg: DictConfig, total_updates: int):
    """Megatron's learning-rate schedule: linear warm-up, then constant / linear / cosine decay to min_lr
    over the run's optimiser steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optim = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=max(total_updates, optim.lr_warmup_steps + 1),
        lr_decay_style=setting_value(optim.lr_decay_style),
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
        # On resume the config's schedule wins and the checkpoint gives the position in it: a changed
        # optim.lr or train.steps applies (Megatron's default keeps the checkpoint's and says so only in
        # its INFO log).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
