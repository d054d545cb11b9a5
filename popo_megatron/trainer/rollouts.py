"""One step's rollouts: generate and grade on every engine replica, then share them with every rank.

The world is split into rollout replicas of `rollout.tensor_parallel_size`
ranks (one vLLM engine each). The step's prompts (the same list on every
rank) are cut into one contiguous share per replica; each replica generates
and grades its share, and one all-gather gives every rank every group. Prompt
j of the step is sampled with seed `step_seed + j` whichever replica serves
it, so the rollouts of a step do not depend on the number of replicas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.data.problems import Problem
from popo_megatron.data.prompts import render_prompt
from popo_megatron.reward.grade import Grade, Verifier
from popo_megatron.rollout.engine import Response, RolloutEngine, SamplingSettings
from popo_megatron.rollout.seeds import round_seed


@dataclass
class Group:
    """A prompt and its G graded responses."""

    problem: Problem
    prompt: list[int]
    responses: list[Response]
    texts: list[str]
    grades: list[Grade]

    @property
    def rewards(self) -> list[float]:
        return [g.score for g in self.grades]


@dataclass
class RolloutTimes:
    generate_s: float  # the slowest replica's
    grade_s: float
    generated_tokens: int  # over all replicas


def replica_of_rank(rollout_tp: int) -> tuple[int, int]:
    """(this rank's rollout replica, the number of replicas)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % rollout_tp:
        raise ValueError(f"rollout.tensor_parallel_size={rollout_tp} does not divide the world size {world}")
    return rank // rollout_tp, world // rollout_tp


def _share(count: int, parts: int, part: int) -> range:
    """The contiguous indices of `part` when `count` items are cut into `parts` near-equal shares."""
    base, extra = divmod(count, parts)
    start = part * base + min(part, extra)
    return range(start, start + base + (part < extra))


def collect_groups(
    engine: RolloutEngine,
    verifier: Verifier,
    tokenizer: Any,
    problems: Sequence[Problem],
    cfg: DictConfig,
    step_seed: int,
) -> tuple[list[Group], RolloutTimes]:
    """Every group of the step, in the order of `problems`, on every rank (collective)."""
    rollout_tp = cfg.rollout.tensor_parallel_size
    replica, replicas = replica_of_rank(rollout_tp)
    mine = _share(len(problems), replicas, replica)
    groups: list[Group] = []
    generate_s = grade_s = 0.0
    tokens = 0
    if len(mine):
        data = cfg.data
        prompts = [render_prompt(problems[j].problem, tokenizer, data.prompt_template, data.instruction) for j in mine]
        generation = engine.generate(prompts, SamplingSettings.from_config(cfg.rollout), step_seed + mine.start)
        generate_s, tokens = generation.seconds, generation.generated_tokens
        texts = [[tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in g] for g in generation.responses]
        start = time.perf_counter()
        n = cfg.rollout.n
        grades = verifier.grade([t for g in texts for t in g], [problems[j].answer for j in mine for _ in range(n)])
        grade_s = time.perf_counter() - start
        for i, j in enumerate(mine):
            group_grades = grades[i * n : (i + 1) * n]
            groups.append(Group(problems[j], prompts[i], generation.responses[i], texts[i], group_grades))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return groups, RolloutTimes(generate_s, grade_s, tokens)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (groups, generate_s, grade_s, tokens))
    # The ranks of one replica hold the same groups: take the first rank of each.
    firsts = [gathered[r * rollout_tp] for r in range(replicas)]
    everything = [g for part in firsts for g in part[0]]
    times = RolloutTimes(max(p[1] for p in firsts), max(p[2] for p in firsts), sum(p[3] for p in firsts))
    return everything, times


@dataclass
class StepRollouts:
    trained: list[Group]  # the groups the step learns from
    generated: list[Group]  # every group sampled this step (all rounds): what reward metrics describe
    times: RolloutTimes
    rounds: int


def collect_step(
    engine: RolloutEngine,
    verifier: Verifier,
    tokenizer: Any,
    next_problems: Callable[[int], list[Problem]],
    cfg: DictConfig,
    step_seed: int,
    has_signal: Callable[[list[float]], bool],
) -> StepRollouts:
    """The step's groups. With data.dynamic_sampling (DAPO), groups without a learning signal (`has_signal`
    of their rewards: the objective's) are dropped
    and more prompts are sampled, until train.prompts_per_step groups have one or
    data.dynamic_sampling_max_rounds rounds were generated (the step then learns from what it has)."""
    want = cfg.train.prompts_per_step
    kept: list[Group] = []
    generated: list[Group] = []
    times = RolloutTimes(0.0, 0.0, 0)
    rounds = 0
    while True:
        problems = next_problems(want - len(kept))
        new, t = collect_groups(engine, verifier, tokenizer, problems, cfg, round_seed(step_seed, rounds))
        times = RolloutTimes(
            times.generate_s + t.generate_s, times.grade_s + t.grade_s, times.generated_tokens + t.generated_tokens
        )
        generated += new
        rounds += 1
        if not cfg.data.dynamic_sampling:
            return StepRollouts(new, generated, times, rounds)
        kept += [g for g in new if has_signal(g.rewards)]
        if len(kept) >= want or rounds >= cfg.data.dynamic_sampling_max_rounds:
            return StepRollouts(kept[:want], generated, times, rounds)
