"""The drift controllers (popo_megatron.algo.drift) in closed loop with a simulated twin, and their edges.

The plant: for an EMA with step size a = 1 - m following a policy that moves v
per step, the lag obeys lag <- (1 - a) lag + v, settling at v / a; the drift
the loss measures is proportional to the lag, with noise. Two versions: the
settled form d = c / a (the design note's model) and the lag recursion itself
(slower, it has memory). The adaptive law must reach d_target from above and
from below and stay off its bounds; the retired law, driven the same way,
pins to a bound (kept here as a regression test of the reasoning, not in the
package).
"""

from __future__ import annotations

import math
import random

import pytest

from popo_megatron.algo.drift import SimilarityWeight, TwinMomentum, log_step
from popo_megatron.config.schema import AdaptiveAlphaConfig, AdaptiveMomentumConfig, TargetConfig

TARGET = 0.02
STEPS = 600
# c / a = TARGET at a = 0.01 (m = 0.99), well inside [1 - m_max, 1 - m_min] = [1e-4, 0.1].
C = TARGET * 0.01


def _target(tau: float, schedule: str = "adaptive", **law) -> TargetConfig:
    return TargetConfig(tau=tau, schedule=schedule, adaptive=AdaptiveMomentumConfig(**law))


def _settled(a: float, state: dict) -> float:
    return C / a


def _lagging(a: float, state: dict) -> float:
    state["lag"] = (1 - a) * state.get("lag", 0.0) + C  # v = C: the lag settles at C / a
    return state["lag"]


def _drive(advance, momentum, plant, seed: int = 0, noise: float = 0.3) -> tuple[list[float], list[float]]:
    """Run the loop: each step the plant turns the current step size into a noisy drift, the law advances."""
    rng = random.Random(seed)
    state: dict = {}
    drifts, momenta = [], []
    for _ in range(STEPS):
        clean = plant(1.0 - momentum(), state)
        advance(clean * math.exp(rng.gauss(0.0, noise)))
        drifts.append(clean)
        momenta.append(momentum())
    return drifts, momenta


@pytest.mark.parametrize("plant", [_settled, _lagging], ids=["settled", "lagging"])
@pytest.mark.parametrize("m0", [0.9999, 0.9], ids=["from_above", "from_below"])
def test_adaptive_law_converges_to_the_target_and_stays_off_its_bounds(plant, m0):
    cfg = _target(m0, d_target=TARGET)
    law = TwinMomentum(cfg)
    drifts, momenta = _drive(law.advance, lambda: law.value, plant)
    first = drifts[0] / TARGET
    if plant is _settled:  # the start is on the side the name says (the lagging plant starts with no lag)
        assert (first > 1) == (m0 == 0.9999)
    tail = drifts[-STEPS // 3 :]
    mean = sum(tail) / len(tail)
    assert mean == pytest.approx(TARGET, rel=0.15), f"drift settles at {mean:.4f}, target {TARGET}"
    assert max(tail) < 2 * TARGET and min(tail) > TARGET / 2
    bounds = cfg.adaptive
    assert all(bounds.m_min < m < bounds.m_max for m in momenta[-STEPS // 2 :]), "the law sits on a bound"


def _retired_law(m: float, drift: float, cfg: AdaptiveMomentumConfig, kappa: float = 1.0) -> float:
    """Earlier revisions of the design note: m <- clamp(m exp(kappa (d - d_target)), m_min, m_max)."""
    return min(max(m * math.exp(kappa * (drift - cfg.d_target)), cfg.m_min), cfg.m_max)


@pytest.mark.parametrize("m0", [0.9999, 0.99, 0.9])
def test_retired_law_pins_to_a_bound(m0):
    """Positive feedback: a slower twin lags more, which raises d, which slows it further. Its fixed point
    (m = 0.99 here) is unstable: started exactly there, the drift's noise pushes it off for good."""
    cfg = _target(m0, d_target=TARGET)
    state = {"m": m0}

    def advance(drift):
        state["m"] = _retired_law(state["m"], drift, cfg.adaptive)

    _, momenta = _drive(advance, lambda: state["m"], _settled)
    assert momenta[-1] in (cfg.adaptive.m_min, cfg.adaptive.m_max)
    assert all(m == momenta[-1] for m in momenta[-STEPS // 2 :]), "it stays there"
    # The same start and noise under the adaptive law: near the fixed point a = 0.01.
    law = TwinMomentum(cfg)
    _, momenta = _drive(law.advance, lambda: law.value, _settled)
    assert sum(momenta[-100:]) / 100 == pytest.approx(0.99, abs=2e-3)


def test_adaptive_law_steps_and_state():
    cfg = _target(0.99, d_target=0.02, kappa=0.1, max_log_step=0.2)
    law = TwinMomentum(cfg)
    law.advance(0.04)  # twice the target: a grows by exp(0.1)
    assert 1 - law.value == pytest.approx(0.01 * math.exp(0.1))
    law.advance(10.0)  # 500x the target: the change is capped at exp(0.2)
    assert 1 - law.value == pytest.approx(0.01 * math.exp(0.3))
    before = law.value
    law.advance(None)  # no positive token: nothing measured
    law.advance(float("nan"))
    assert law.value == before and law.step == 4
    for _ in range(200):
        law.advance(0.0)  # no drift at all: the twin slows down to m_max
    assert law.value == pytest.approx(cfg.adaptive.m_max)
    restored = TwinMomentum(cfg)
    restored.load_state_dict(law.state_dict())
    assert (restored.value, restored.step) == (law.value, law.step)
    assert log_step(0.01, 0.02, 0.1, 0.2) == pytest.approx(-0.05)


def test_constant_and_cosine_schedules():
    constant = TwinMomentum(_target(0.97, "constant"))  # the paper's fixed tau: no drift moves it
    constant.advance(5.0)
    assert constant.value == 0.97
    assert TwinMomentum(TargetConfig()).value == 0.995, "the authors' default"
    cosine = TwinMomentum(_target(0.9, "cosine"), total_steps=4)
    values = []
    for _ in range(5):
        values.append(cosine.value)
        cosine.advance()
    assert values[0] == pytest.approx(0.9) and values[-1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 2)) / 2)
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="total number of steps"):
        TwinMomentum(_target(0.99, "cosine"))


def test_adaptive_alpha_follows_the_drift_and_is_off_by_default():
    fixed = SimilarityWeight(0.1, AdaptiveAlphaConfig(), d_target=TARGET)
    fixed.advance(1.0)
    assert fixed.value == 0.1, "off by default: alpha stays"

    on = AdaptiveAlphaConfig(enabled=True, alpha_min=0.01, alpha_max=0.1)
    alpha = SimilarityWeight(0.05, on, d_target=TARGET)
    alpha.advance(0.03)  # drift 1.5x the target: the pull to the target grows
    assert alpha.value == pytest.approx(0.05 * math.exp(0.1 * 0.5))
    alpha.advance(0.0)  # no drift: it weakens by the capped step... until alpha_min
    assert alpha.value == pytest.approx(0.05 * math.exp(0.05) * math.exp(-0.1))
    for _ in range(100):
        alpha.advance(2.0)
    assert alpha.value == 0.1, "clamped at alpha_max"
    restored = SimilarityWeight(0.05, on, d_target=TARGET)
    restored.load_state_dict(alpha.state_dict())
    assert restored.value == alpha.value
