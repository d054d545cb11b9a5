"""Step metrics: the registry of every metric a step reports, and their accumulation over micro-batches
and ranks.

The registry (`METRICS`) declares each metric once: its name (the accumulator's key and the TensorBoard
tag), how it reduces (mean as (sum, count), total, max, min), where it is measured (the last pipeline
stage, where the loss is, or every rank), its metrics.jsonl column when it has one, and which algorithm
produces it. Producers pass these constants to `MetricAccumulator`; the trainer and the logbook read the
registry to reduce and to write them; docs/metrics.md documents them (a test keeps the two equal).

Micro-batches add partial sums as tensors (no host synchronisation in the step); `reduce` combines them
over a process group in two collectives, whatever the number of metrics. A mean whose count is 0 on every
rank (e.g. ratio statistics in a step without positives) is left out of the result; with `count_keys` its
count is reported as `NAME/count`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.distributed as dist

from popo_megatron.platform import collective_device

Number = torch.Tensor | float | int


class Reduce(enum.Enum):
    mean = "mean"  # sum / count over micro-batches and ranks
    total = "total"  # sum
    max = "max"
    min = "min"
    none = "none"  # a value of the step the recipe computes itself (a time, the learning rate)


class Where(enum.Enum):
    last_stage = "last_stage"  # the loss side: only the last pipeline stage has it (broadcast to the others)
    every_rank = "every_rank"  # the rollouts: every rank has every group


BOTH = ("popo", "grpo")


@dataclass(frozen=True)
class Metric:
    name: str  # the accumulator's key and the TensorBoard tag
    reduce: Reduce
    where: Where = Where.every_rank
    jsonl: str | None = None  # its own metrics.jsonl column (every metric is also under the record's "all")
    algorithms: tuple[str, ...] = BOTH
    when: str = ""  # the condition under which a step produces it, beyond the algorithm

    def derived(self, suffix: str, reduce: Reduce, jsonl: str | None = None) -> Metric:
        """The metric NAME_suffix (the max / min of a masked mean)."""
        return Metric(self.name + suffix, reduce, self.where, jsonl, self.algorithms, self.when)


METRICS: dict[str, Metric] = {}


def _declare(metric: Metric, extremes: bool = False, max_jsonl: str | None = None) -> Metric:
    for m in [metric] + (
        [metric.derived("_max", Reduce.max, max_jsonl), metric.derived("_min", Reduce.min)] if extremes else []
    ):
        assert m.name not in METRICS, f"metric {m.name} declared twice"
        METRICS[m.name] = m
    return metric


_LAST, _EVERY = Where.last_stage, Where.every_rank
# The reasons a grade can have (popo_megatron.reward.grade); each is counted every step.
GRADE_REASONS = (
    "correct",
    "mismatch",
    "not_literal",
    "no_answer",
    "parse_failure",
    "bad_gold",
    "timeout",
    "worker_crash",
)

# --- rollouts and rewards (every group of the step, all dynamic-sampling rounds) ---------------------------
REWARD_MEAN = _declare(Metric("reward/mean", Reduce.mean, _EVERY, "reward_mean"))
REWARD_REASONS = {
    reason: _declare(
        Metric(f"reward/{reason}", Reduce.total, _EVERY, "reward_timeouts" if reason == "timeout" else None)
    )
    for reason in GRADE_REASONS
}
# Correct answers whose extracted answer holds two or more of the problem's own numbers and an operator: the
# shape of a reward earned by restating the problem (popo_megatron.reward.restated).
RESTATED_PROBLEM = _declare(Metric("reward/restated_problem", Reduce.total, _EVERY))
POSITIVE_FRACTION = _declare(Metric("reward/positive_fraction", Reduce.mean, _EVERY, "positive_frac"))
GROUPS = _declare(Metric("reward/groups", Reduce.total, _EVERY))
GROUPS_WITHOUT_POSITIVES = _declare(
    Metric("reward/groups_without_positives", Reduce.total, _EVERY, "groups_without_positive")
)
GROUPS_ALL_POSITIVE = _declare(Metric("reward/groups_all_positive", Reduce.total, _EVERY, "groups_all_positive"))
RESPONSE_LENGTH = _declare(Metric("response/length", Reduce.mean, _EVERY, "response_len_mean"))
RESPONSE_TRUNCATED = _declare(Metric("response/truncated", Reduce.mean, _EVERY))
ROUNDS = _declare(Metric("data/rounds", Reduce.mean, _EVERY))
GROUPS_TRAINED = _declare(Metric("data/groups_trained", Reduce.mean, _EVERY))
TRAINED_TOKENS = _declare(Metric("data/trained_tokens", Reduce.total, _EVERY, "trained_tokens"))

# --- the loss side (last pipeline stage) --------------------------------------------------------------------
LOSS_TOTAL = _declare(Metric("loss/total", Reduce.mean, _LAST, "loss", when="an update"))
LOSS_POLICY = _declare(Metric("loss/policy", Reduce.mean, _LAST, "pos_loss", when="an update"))
ENTROPY = _declare(Metric("entropy", Reduce.mean, _LAST, "entropy", when="an update"))
SKIPPED_UPDATES = _declare(Metric("train/skipped_updates", Reduce.total, _EVERY, when="a mini-batch without signal"))
NONFINITE_STEPS = _declare(
    Metric("train/nonfinite_steps", Reduce.total, _EVERY, "nonfinite_steps", when="a non-finite gradient norm")
)
# The paper's three terms as it defines them (unweighted by alpha and beta_ent): L = L_NLL + alpha L_sim +
# beta_ent L_ent.
LOSS_NLL = _declare(Metric("loss/nll", Reduce.mean, _LAST, "nll", ("popo",), "an update"))
_TARGET = "an update with the EMA target (popo.alpha > 0)"
LOSS_SIMILARITY = _declare(Metric("loss/similarity", Reduce.mean, _LAST, "sim_loss", ("popo",), _TARGET))
LOSS_ENTROPY = _declare(Metric("loss/entropy", Reduce.mean, _LAST, "ent_loss", ("popo",), "an update"))
# 1 - cos between the online and the target's features (pooled: per row with w > 0, before the predictor
# and the noise; per_token: per positive token, after the predictor): how far the target lags, the input of
# the adaptive momentum and alpha.
POPO_DRIFT = _declare(Metric("popo/drift", Reduce.mean, _LAST, "drift", ("popo",), _TARGET))
POPO_KL = _declare(
    Metric(
        "popo/kl_to_target",
        Reduce.mean,
        _LAST,
        "kl_to_target",
        ("popo",),
        f"{_TARGET}, every popo.target.kl_every steps",
    )
)
POPO_POLICY_SCALE = _declare(Metric("popo/policy_scale", Reduce.mean, _LAST, None, ("popo",), "an update"))
POPO_WEIGHT = _declare(Metric("popo/weight", Reduce.mean, _LAST, None, ("popo",), "an update"), True)
POPO_RATIO = _declare(
    Metric("popo/ratio", Reduce.mean, _LAST, "ratio_mean", ("popo",), "an update with popo.is_bound.mode != none"),
    True,
    "ratio_max",
)
POPO_CLIP_FRACTION = _declare(
    Metric(
        "popo/clip_fraction", Reduce.mean, _LAST, "clip_frac", ("popo",), "an update with popo.is_bound.mode != none"
    )
)
GRPO_RATIO = _declare(Metric("grpo/ratio", Reduce.mean, _LAST, "ratio_mean", ("grpo",), "an update"), True, "ratio_max")
GRPO_CLIP_FRACTION = _declare(Metric("grpo/clip_fraction", Reduce.mean, _LAST, "clip_frac", ("grpo",), "an update"))
GRPO_KL = _declare(Metric("grpo/kl", Reduce.mean, _LAST, None, ("grpo",), "an update with grpo.kl_beta > 0"))
LOGPROB_MISMATCH = _declare(
    Metric(
        "rollout/logprob_abs_diff",
        Reduce.mean,
        _LAST,
        "logprob_mismatch",
        when="an update with loss.old_logprobs=trainer",
    )
)
LOGPROB_MISMATCH_MAX = _declare(
    Metric(
        "rollout/logprob_abs_diff_max",
        Reduce.max,
        _LAST,
        "logprob_mismatch_max",
        when="an update with loss.old_logprobs=trainer",
    )
)
TIS_WEIGHT = _declare(
    Metric("rollout/tis_weight", Reduce.mean, _LAST, when="an update with loss.rollout_correction=tis")
)

# --- values of the step the recipe computes (metrics.jsonl columns, TensorBoard train/NAME) -----------------
_TWIN = "the EMA target (popo.alpha > 0)"
STEP_VALUES = {
    m.jsonl: _declare(m)
    for m in [
        Metric("train/twin_momentum", Reduce.none, _EVERY, "twin_momentum", ("popo",), _TWIN),
        Metric("train/alpha", Reduce.none, _EVERY, "alpha", ("popo",), _TWIN),
        Metric("train/lr", Reduce.none, _EVERY, "lr"),
        Metric("train/grad_norm", Reduce.none, _EVERY, "grad_norm", when="an update"),
        Metric("train/time_rollout_s", Reduce.none, _EVERY, "time_rollout_s"),
        Metric("train/time_reward_s", Reduce.none, _EVERY, "time_reward_s"),
        Metric("train/time_train_s", Reduce.none, _EVERY, "time_train_s"),
        Metric("train/time_old_logprobs_s", Reduce.none, _EVERY, "time_old_logprobs_s"),
        Metric("train/time_twin_forward_s", Reduce.none, _EVERY, "time_twin_forward_s"),
        Metric("train/time_sync_s", Reduce.none, _EVERY, "time_sync_s"),
        Metric("train/time_step_s", Reduce.none, _EVERY, "time_step_s"),
        Metric("train/tokens_per_s", Reduce.none, _EVERY, "tokens_per_s"),
    ]
}


def _checked(metric: Metric, reduce: Reduce) -> str:
    if metric.reduce != reduce:
        raise ValueError(f"metric {metric.name} reduces by {metric.reduce.value}, not {reduce.value}")
    return metric.name


def _f64(value: Number) -> torch.Tensor:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else torch.tensor(float(value))


class MetricAccumulator:
    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._maxes: dict[str, torch.Tensor] = {}
        self._mins: dict[str, torch.Tensor] = {}

    def add_total(self, metric: Metric, value: Number) -> None:
        """A quantity that adds up over micro-batches and ranks (e.g. a loss made of shares)."""
        self._total(_checked(metric, Reduce.total), _f64(value))

    def add_mean(self, metric: Metric, total: Number, count: Number) -> None:
        self._mean(_checked(metric, Reduce.mean), _f64(total), _f64(count))

    def add_max(self, metric: Metric, value: Number) -> None:
        self._max(_checked(metric, Reduce.max), _f64(value))

    def add_masked(self, metric: Metric, values: torch.Tensor, mask: torch.Tensor, extremes: bool = False) -> None:
        """Mean (and with `extremes`, max and min as NAME_max / NAME_min) of `values` where `mask` is true."""
        values = values.detach().to(torch.float64)
        self.add_mean(metric, torch.where(mask, values, 0.0).sum(), mask.sum())
        if extremes:
            self.add_max(metric.derived("_max", Reduce.max), torch.where(mask, values, float("-inf")).max())
            self._min(metric.name + "_min", torch.where(mask, values, float("inf")).min())

    def _total(self, name: str, value: torch.Tensor) -> None:
        self._totals[name] = value if name not in self._totals else self._totals[name].to(value.device) + value

    def _mean(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        if name in self._sums:
            total, count = total + self._sums[name].to(total.device), count + self._counts[name].to(count.device)
        self._sums[name], self._counts[name] = total, count

    def _max(self, name: str, value: torch.Tensor) -> None:
        self._maxes[name] = value if name not in self._maxes else torch.maximum(self._maxes[name], value)

    def _min(self, name: str, value: torch.Tensor) -> None:
        self._mins[name] = value if name not in self._mins else torch.minimum(self._mins[name], value)

    def merge(self, other: MetricAccumulator) -> None:
        for name, value in other._totals.items():
            self._total(name, value)
        for name, total in other._sums.items():
            self._mean(name, total, other._counts[name])
        for name, value in other._maxes.items():
            self._max(name, value)
        for name, value in other._mins.items():
            self._min(name, value)

    def reduce(
        self, group: dist.ProcessGroup | None = None, count_keys: bool = False, local: bool = False
    ) -> dict[str, float]:
        """Combine over `group` (every rank of it calls, with the same metric names) into plain floats;
        `local`: this rank's values alone, no collective (for what every rank holds whole, e.g. the rollouts)."""
        totals, means = sorted(self._totals), sorted(self._sums)
        maxes, mins = sorted(self._maxes), sorted(self._mins)
        device = collective_device()
        sums = torch.stack(
            [self._totals[n].to(device) for n in totals]
            + [self._sums[n].to(device) for n in means]
            + [self._counts[n].to(device) for n in means]
            or [torch.zeros((), dtype=torch.float64, device=device)]
        )
        highs = torch.stack(
            [self._maxes[n].to(device) for n in maxes] + [-self._mins[n].to(device) for n in mins]
            or [torch.zeros((), dtype=torch.float64, device=device)]
        )
        if not local and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=group)
        sums, highs = sums.tolist(), highs.tolist()
        out: dict[str, float] = dict(zip(totals, sums[: len(totals)], strict=True))
        sums = sums[len(totals) :]
        for i, name in enumerate(means):
            total, count = sums[i], sums[len(means) + i]
            if count > 0:
                out[name] = total / count
            if count_keys:
                out[name + "/count"] = count
        for i, name in enumerate(maxes + mins):
            value = highs[i]
            if value != float("-inf"):
                out[name] = value if i < len(maxes) else -value
        return out
