"""Adam state before the first step, for optimisers that create it lazily per parameter.

Megatron's optimisers describe their checkpoint from their current state. torch's Adam / AdamW (what
megatron-core uses without Apex or Transformer Engine, so on CPU) create a parameter's state, with a
per-parameter `step` tensor, at its first update; the distributed optimiser then fails on the empty
state when saving before any update (a run whose first steps had no positive) and when loading.
Transformer Engine's FusedAdam and Apex keep `step` per parameter group and are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from popo_megatron.platform.megatron_compat import inner_optimizers

# Optimiser classes whose state (a `step` tensor included) is created per parameter at its first update.
LAZY_PER_PARAMETER_STATE = (torch.optim.Adam, torch.optim.AdamW)


def materialise_optimizer_state(optimizer: Any) -> None:
    """Give every parameter the Adam state a fresh optimiser would have before its first step.

    A step with zero gradients at learning rate 0 creates the state without moving any weight, and its
    step count is set back to 0. Optimisers outside LAZY_PER_PARAMETER_STATE are not touched.
    """
    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, LAZY_PER_PARAMETER_STATE):
            continue
        missing = [p for g in inner.param_groups for p in g["params"] if p not in inner.state]
        if not missing:
            continue
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
        for param in missing:
            param.grad = torch.zeros_like(param)
        inner.step()
        for group, rate in zip(inner.param_groups, rates, strict=True):
            group["lr"] = rate
        for param in missing:
            param.grad = None
            inner.state[param]["step"].zero_()
