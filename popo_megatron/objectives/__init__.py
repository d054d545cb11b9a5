"""The RL objectives, one module each behind one interface (objectives/base.py): `algorithm` picks one."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from popo_megatron.objectives.base import MiniContext, Objective, ObjectiveContext
from popo_megatron.objectives.grpo import GrpoObjective
from popo_megatron.objectives.popo import PopoObjective

# algorithm -> (the objective, its config section)
OBJECTIVES: dict[str, tuple[type[Objective], str]] = {
    "popo": (PopoObjective, "popo"),
    "grpo": (GrpoObjective, "grpo"),
}


def build_objective(cfg: DictConfig, context: ObjectiveContext, model: torch.nn.Module) -> Objective:
    """The objective `cfg.algorithm` names, reading its own section of `cfg` (collective where it keeps a copy
    of the policy: a distributed optimiser's slices)."""
    from popo_megatron.config.schema import setting_value

    objective, section = OBJECTIVES[setting_value(cfg.algorithm)]
    return objective(cfg[section], context, model)


__all__ = ["MiniContext", "OBJECTIVES", "Objective", "ObjectiveContext", "build_objective"]
