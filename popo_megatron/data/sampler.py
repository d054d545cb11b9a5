"""Which prompts each step uses: a fresh deterministic shuffle per epoch, resumable exactly.

The order depends only on (seed, epoch), so a run resumed from a checkpoint
(`state_dict`: epoch and position) sees the same prompts in the same order as
one that never stopped, on any number of ranks.
"""

from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("cannot sample prompts from an empty dataset")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_indices(self, count: int) -> list[int]:
        """The next `count` dataset indices (continuing into the next epoch's shuffle when one ends)."""
        out: list[int] = []
        while len(out) < count:
            take = min(count - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["seed"]) != (self.size, self.seed):
            raise ValueError(
                f"prompt sampler state of a dataset of {state['size']} with seed {state['seed']} does not fit "
                f"this one ({self.size}, seed {self.seed}): was the dataset or data.shuffle_seed changed?"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
