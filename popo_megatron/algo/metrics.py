"""Step metrics gathered over micro-batches and ranks: totals, means as (sum, count), max and min.

Micro-batches add partial sums as tensors (no host synchronisation in the
step); `reduce` combines them over a process group in two collectives,
whatever the number of metrics. A mean whose count is 0 on every rank (e.g.
ratio statistics in a step without positives) is left out of the result; with
`count_keys` its count is reported as `NAME/count`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from popo_megatron.platform import collective_device

Number = torch.Tensor | float | int


def _f64(value: Number) -> torch.Tensor:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else torch.tensor(float(value))


class MetricAccumulator:
    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._maxes: dict[str, torch.Tensor] = {}
        self._mins: dict[str, torch.Tensor] = {}

    def add_total(self, name: str, value: Number) -> None:
        """A quantity that adds up over micro-batches and ranks (e.g. a loss made of shares)."""
        value = _f64(value)
        self._totals[name] = value if name not in self._totals else self._totals[name].to(value.device) + value

    def add_mean(self, name: str, total: Number, count: Number) -> None:
        total, count = _f64(total), _f64(count)
        if name in self._sums:
            total, count = total + self._sums[name].to(total.device), count + self._counts[name].to(count.device)
        self._sums[name], self._counts[name] = total, count

    def add_max(self, name: str, value: Number) -> None:
        value = _f64(value)
        self._maxes[name] = value if name not in self._maxes else torch.maximum(self._maxes[name], value)

    def add_min(self, name: str, value: Number) -> None:
        value = _f64(value)
        self._mins[name] = value if name not in self._mins else torch.minimum(self._mins[name], value)

    def add_masked(self, name: str, values: torch.Tensor, mask: torch.Tensor, extremes: bool = False) -> None:
        """Mean (and with `extremes`, max and min as NAME_max / NAME_min) of `values` where `mask` is true."""
        values = values.detach().to(torch.float64)
        self.add_mean(name, torch.where(mask, values, 0.0).sum(), mask.sum())
        if extremes:
            self.add_max(name + "_max", torch.where(mask, values, float("-inf")).max())
            self.add_min(name + "_min", torch.where(mask, values, float("inf")).min())

    def merge(self, other: "MetricAccumulator") -> None:
        for name, value in other._totals.items():
            self.add_total(name, value)
        for name, total in other._sums.items():
            self.add_mean(name, total, other._counts[name])
        for name, value in other._maxes.items():
            self.add_max(name, value)
        for name, value in other._mins.items():
            self.add_min(name, value)

    def reduce(self, group: dist.ProcessGroup | None = None, count_keys: bool = False) -> dict[str, float]:
        """Combine over `group` (every rank of it calls, with the same metric names) into plain floats."""
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
        if dist.is_initialized() and dist.get_world_size(group) > 1:
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
