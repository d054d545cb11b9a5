"""The twin's momentum m_t (popo-algorithm.md, section 3), one value per optimiser step.

- constant: m_t = m0.
- cosine (BYOL): m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, from m0 at t = 0 to 1 at t = T.
- adaptive: like PPO's adaptive KL controller, on the measured drift d_t (the
  step's mean similarity penalty): m_{t+1} = clamp(m_t exp(kappa (d_t - d_target)), m_min, m_max).
  Drift above target raises m (the twin follows more slowly: a stronger
  anchor); drift below lowers it. A step with no drift measured (no positive
  tokens) leaves m unchanged.

The state is one step counter and one float; it goes into the training
checkpoint so that a resumed run continues with the same momentum.
"""

from __future__ import annotations

import math

from popo_megatron.config.schema import MomentumSchedule


class TwinMomentum:
    def __init__(
        self,
        schedule: MomentumSchedule | str = MomentumSchedule.adaptive,
        m0: float = 0.99,
        d_target: float = 0.02,
        kappa: float = 1.0,
        m_min: float = 0.9,
        m_max: float = 0.9999,
        total_steps: int | None = None,
    ) -> None:
        self.schedule = MomentumSchedule(schedule)
        if self.schedule == MomentumSchedule.cosine and not total_steps:
            raise ValueError("the cosine momentum schedule needs the run's total number of steps")
        self.m0, self.d_target, self.kappa = m0, d_target, kappa
        self.m_min, self.m_max = m_min, m_max
        self.total_steps = total_steps
        self.step = 0
        self._adaptive = min(max(m0, m_min), m_max)

    @classmethod
    def from_config(cls, momentum_cfg, total_steps: int | None = None) -> "TwinMomentum":
        return cls(
            momentum_cfg.schedule,
            momentum_cfg.m0,
            momentum_cfg.d_target,
            momentum_cfg.kappa,
            momentum_cfg.m_min,
            momentum_cfg.m_max,
            total_steps,
        )

    @property
    def value(self) -> float:
        """m_t for the update after the current step."""
        if self.schedule == MomentumSchedule.constant:
            return self.m0
        if self.schedule == MomentumSchedule.cosine:
            progress = min(self.step / self.total_steps, 1.0)
            return 1.0 - (1.0 - self.m0) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return self._adaptive

    def advance(self, drift: float | None = None) -> None:
        """Move to the next step, given the step's measured drift (the adaptive law's input)."""
        if self.schedule == MomentumSchedule.adaptive and drift is not None and math.isfinite(drift):
            raised = self._adaptive * math.exp(self.kappa * (drift - self.d_target))
            self._adaptive = min(max(raised, self.m_min), self.m_max)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "adaptive": self._adaptive}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._adaptive = float(state["adaptive"])
