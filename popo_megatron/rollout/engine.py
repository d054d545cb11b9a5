"""The rollout engine interface: what the trainer needs from whatever samples the policy.

An engine generates n responses per prompt with the sampled tokens'
log-probabilities (after temperature, as the trainer computes them), takes
new weights as HF-named tensors, can free its memory while the trainer runs
(sleep / wake), and shuts down without taking the trainer's process group
with it. popo_megatron.rollout.vllm_engine is the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingSettings:
    n: int  # responses per prompt (the group size G)
    temperature: float
    top_p: float
    max_tokens: int  # the response length limit
    top_k: int  # 0: off

    @classmethod
    def from_config(cls, rollout_cfg) -> SamplingSettings:
        """The rollout's sampling (`rollout.*`, whose defaults are the schema's)."""
        return cls(rollout_cfg.n, rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.max_tokens, rollout_cfg.top_k)

    def greedy(self, n: int = 1) -> SamplingSettings:
        return SamplingSettings(n=n, temperature=0.0, top_p=1.0, max_tokens=self.max_tokens, top_k=0)


@dataclass(frozen=True)
class Response:
    token_ids: list[int]  # the stop token included when the response ended on it
    logprobs: list[float]  # of each sampled token under the sampling distribution (after temperature)
    finish_reason: str  # "stop" (end of sequence / stop token) or "length" (cut at max_tokens)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Generation:
    """The responses to a list of prompts: `responses[i]` holds prompt i's n responses."""

    responses: list[list[Response]]
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.token_ids) for group in self.responses for r in group)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings, seed: int) -> Generation:
        """n responses per prompt (token ids in, token ids out); `seed` makes the sampling reproducible."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight (HF names, full tensors) and drop caches computed with the old ones."""

    def sleep(self) -> None:
        """Free the engine's device memory while the trainer runs (a no-op where unsupported)."""

    def wake(self) -> None:
        """Undo `sleep` before the next generation or weight update."""

    def shutdown(self) -> None:
        """Stop the engine, leaving the trainer's process group intact."""
