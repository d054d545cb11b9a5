"""Dynamic sampling (DAPO): groups without a learning signal are dropped and refilled, up to a cap.

A unit test of the trainer's own glue: the engine and the verifier are stand-ins that make the signal of
each group known in advance (a problem whose answer is "1" gets one correct response).
"""

from __future__ import annotations

from itertools import count

import pytest

from popo_megatron.config import load_config
from popo_megatron.data.problems import Problem
from popo_megatron.data.synthetic import arithmetic_tokenizer
from popo_megatron.reward.grade import Grade
from popo_megatron.rollout.engine import Generation, Response
from popo_megatron.rollout.seeds import ROUND_SEED_STRIDE
from popo_megatron.trainer.rollouts import collect_step

N = 4


class RecordingEngine:
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def generate(self, prompts, sampling, seed):
        self.seeds.append(seed)
        return Generation([[Response([3 + j], [-1.0], "stop") for j in range(sampling.n)] for _ in prompts], 0.1)


class OneCorrectWhenAnswerIsOne:
    def grade(self, responses, golds):
        return [Grade(1.0 if gold == "1" and i % N == 0 else 0.0, "x") for i, gold in enumerate(golds)]


def _problems(answers):
    numbers = count()
    stream = iter(answers)
    return lambda k: [Problem(f"p{next(numbers)}", next(stream), "test") for _ in range(k)]


def _cfg(*overrides):
    return load_config(
        overrides=[
            "model.hf_path=/x",
            f"rollout.n={N}",
            "train.prompts_per_step=4",
            'data.prompt_template="{problem}"',
            *overrides,
        ]
    )


def _has_signal(algorithm: str):
    """The objective's rule (built without a model: no EMA target or reference to keep)."""
    from popo_megatron.objectives import ObjectiveContext, build_objective

    cfg = _cfg(f"algorithm={algorithm}", "popo.alpha=0", "grpo.kl_beta=0")
    context = ObjectiveContext(cfg.loss, cfg.optim, 16, 8, 1.0, 0, 1, N, 1, False)
    return build_objective(cfg, context, model=None).has_signal


def _collect(cfg, answers):
    engine = RecordingEngine()
    tokenizer = arithmetic_tokenizer()
    result = collect_step(
        engine, OneCorrectWhenAnswerIsOne(), tokenizer, _problems(answers), cfg, 500, _has_signal("popo")
    )
    return result, engine.seeds


def test_refills_until_enough_groups_have_a_positive():
    answers = ["1", "0", "1", "0", "0", "1", "0", "1", "1", "1"]
    result, seeds = _collect(_cfg("data.dynamic_sampling=true"), answers)
    assert len(result.trained) == 4 and all(_has_signal("popo")(g.rewards) for g in result.trained)
    assert [g.problem.problem for g in result.trained] == ["p0", "p2", "p5", "p7"]
    # Refills ask for the missing groups only: 4, then 2, 1 and 1 prompts.
    assert result.rounds == 4 and len(result.generated) == 4 + 2 + 1 + 1
    assert seeds == [500 + r * ROUND_SEED_STRIDE for r in range(4)], "every round has its own seeds"


def test_gives_up_after_the_cap_and_learns_from_what_it_has():
    result, _ = _collect(_cfg("data.dynamic_sampling=true", "data.dynamic_sampling_max_rounds=2"), ["0"] * 8 + ["1"])
    assert result.rounds == 2 and result.trained == [] and len(result.generated) == 8


def test_off_keeps_every_group():
    result, seeds = _collect(_cfg(), ["0", "0", "1", "0"])
    assert len(result.trained) == 4 and result.rounds == 1 and seeds == [500]


@pytest.mark.parametrize("rewards, popo, grpo", [([0, 0], False, False), ([1, 1], True, False), ([0, 1], True, True)])
def test_signal_rule(rewards, popo, grpo):
    assert (_has_signal("popo")(rewards), _has_signal("grpo")(rewards)) == (popo, grpo)
