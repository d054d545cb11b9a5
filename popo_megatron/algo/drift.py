"""The EMA target's momentum and the similarity weight, one update per optimiser step (docs/algorithm.md).

The paper's target has a fixed momentum tau. The other schedules and both controllers are this project's;
the controllers are driven by the measured drift d_t (`popo/drift`): how far the target's features are
from the online model's, measured in the loss forward, before the update.

- `TwinMomentum`, the target's momentum m_t (`popo.target`):
  - constant: m_t = tau (the paper);
  - cosine (BYOL): m_t = 1 - (1 - tau) (1 + cos(pi t / T)) / 2, from tau at t = 0 to 1 at t = T;
  - adaptive: negative feedback on the twin's step size a = 1 - m, in log space,
        log a_{t+1} = log a_t + clamp(kappa (d_t / d_target - 1), -s, s),  a in [1 - m_max, 1 - m_min].
    Drift above target makes the twin follow faster, which shrinks its lag
    and so the drift; drift below makes it a steadier anchor. For an EMA the
    lag behind a policy moving v per step is about v / a, so d ~ c / a and
    the loop converges for small kappa (tests/test_drift_control.py drives
    it with such a lag model). The earlier law m <- m exp(kappa (d - d_target))
    was positive feedback (a slower twin lags more, raising d, slowing it
    further) and sat on a bound; it is retired.
- `SimilarityWeight`, the similarity weight alpha_t (`popo.adaptive_alpha`,
  off by default): PPO's adaptive-KL controller on the drift,
        alpha_{t+1} = clamp(alpha_t exp(clamp(kappa (d_t / d_target - 1), -s, s)), alpha_min, alpha_max).
  The inner clamp bounds one step's change as the twin law does (PPO's
  controller clips its error to +-0.2 the same way).

A step with no drift measured (no positive token) leaves both unchanged. Each
keeps its state in the training checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

from popo_megatron.config.schema import MomentumSchedule


def log_step(drift: float, target: float, kappa: float, max_step: float) -> float:
    """The bounded change of the controlled value's log: clamp(kappa (d / target - 1), -max_step, max_step)."""
    return min(max(kappa * (drift / target - 1.0), -max_step), max_step)


def _measured(drift: float | None) -> bool:
    return drift is not None and math.isfinite(drift)


class TwinMomentum:
    """m_t for the target's EMA, from `popo.target` (see the module docstring)."""

    def __init__(self, target_cfg, total_steps: int | None = None) -> None:
        self.schedule = target_cfg.schedule
        if self.schedule == MomentumSchedule.cosine and not total_steps:
            raise ValueError("the cosine momentum schedule needs the run's total number of steps")
        self.tau = target_cfg.tau
        self.law = target_cfg.adaptive
        self.total_steps = total_steps
        self.step = 0
        self.step_size = self._clamped(1.0 - self.tau)  # a = 1 - m: the adaptive law's state

    def _clamped(self, step_size: float) -> float:
        return min(max(step_size, 1.0 - self.law.m_max), 1.0 - self.law.m_min)

    @property
    def value(self) -> float:
        """m_t for the next update."""
        if self.schedule == MomentumSchedule.constant:
            return self.tau
        if self.schedule == MomentumSchedule.cosine:
            progress = min(self.step / self.total_steps, 1.0)
            return 1.0 - (1.0 - self.tau) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return 1.0 - self.step_size

    def advance(self, drift: float | None = None) -> None:
        """Move to the next update, given this update's measured drift (the adaptive law's input)."""
        if self.schedule == MomentumSchedule.adaptive and _measured(drift):
            change = log_step(drift, self.law.d_target, self.law.kappa, self.law.max_log_step)
            self.step_size = self._clamped(self.step_size * math.exp(change))
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "step_size": self.step_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.step_size = float(state["step_size"])


class SimilarityWeight:
    """alpha_t, the similarity term's weight: `popo.alpha`, adapted when `popo.adaptive_alpha.enabled`
    (towards `popo.target.adaptive.d_target`)."""

    def __init__(self, alpha: float, adaptive_cfg, d_target: float) -> None:
        self.cfg = adaptive_cfg
        self.d_target = d_target
        self.value = float(alpha)
        if self.cfg.enabled:
            self.value = min(max(self.value, self.cfg.alpha_min), self.cfg.alpha_max)

    def advance(self, drift: float | None = None) -> None:
        if self.cfg.enabled and _measured(drift):
            change = log_step(drift, self.d_target, self.cfg.kappa, self.cfg.max_log_step)
            self.value = min(max(self.value * math.exp(change), self.cfg.alpha_min), self.cfg.alpha_max)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
