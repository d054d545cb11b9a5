"""The Adam-state workaround (platform/optimizer_state.py) is applied to torch's Adam only: it creates the
state a first step would, without moving a weight, and leaves an optimiser that keeps its step per group
(Transformer Engine's FusedAdam, Apex) untouched."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from popo_megatron.platform.optimizer_state import materialise_optimizer_state


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]


def test_torch_adam_gets_its_state_without_moving_a_weight():
    params = _params()
    before = [p.detach().clone() for p in params]
    adam = torch.optim.Adam(params, lr=0.1)
    megatron_like = SimpleNamespace(optimizer=adam)  # a Megatron optimiser wraps its torch one as .optimizer
    materialise_optimizer_state(megatron_like)
    for param, old in zip(params, before, strict=True):
        assert torch.equal(param, old), "the state was made by a step that moved a weight"
        state = adam.state[param]
        assert state["step"].item() == 0 and torch.count_nonzero(state["exp_avg"]) == 0
        assert param.grad is None
    assert adam.param_groups[0]["lr"] == 0.1
    # The first real step is then the same as a fresh optimiser's first step.
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.Adam(fresh_params, lr=0.1)
    for a, b in zip(params, fresh_params, strict=True):
        a.grad = torch.ones_like(a)
        b.grad = torch.ones_like(b)
    adam.step()
    fresh.step()
    for a, b in zip(params, fresh_params, strict=True):
        assert torch.equal(a, b)


class _StepPerGroup(torch.optim.Optimizer):
    """Keeps its step count in the parameter group, as Transformer Engine's FusedAdam does."""

    def __init__(self, params) -> None:
        super().__init__(params, dict(lr=0.1, step=0))

    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] += 1
            for p in group["params"]:
                p.data.add_(-group["lr"])


def test_an_optimiser_with_a_step_per_group_is_left_alone():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = _StepPerGroup(params)
    materialise_optimizer_state(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)]))
    assert opt.param_groups[0]["step"] == 0, "the workaround stepped an optimiser it does not apply to"
    assert not opt.state
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
