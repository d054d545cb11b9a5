"""Console warnings about how a run learns: a reward that may be earned without solving the task, and a
policy whose entropy collapses.

The two reward signs are how the restating hack looked (SmolLM2 on arithmetic word problems, graded by math-verify,
learned to answer "What is 79 * 51?" with `\\boxed{79 * 51}`):

- most of a step's correct answers restate the problem (two or more of its numbers and an operator,
  `reward/restated_problem`): at least RESTATED_SHARE of them, and at least RESTATED_MIN_CORRECT;
- held-out accuracy above the train reward by more than HELDOUT_MARGIN at HELDOUT_EVALS evaluations in a
  row (the start excluded). Held-out problems are unseen, so they should not be easier than training
  ones; a lower evaluation temperature raises held-out accuracy somewhat (the main job: 0.76 at T=1 and
  0.89 at T=0.6 for one checkpoint), hence the margin. The train reward compared is the mean over the
  steps since the previous evaluation.

A grader that cannot read most of a step is a broken reward, not a hard task: a warning when `bad_gold`
(the data's gold answers do not parse) or `parse_failure` (the answers do not) is the majority of a step's
grades.

The entropy warning is the POPO authors'': the step's mean token entropy below a floor
(popo.low_entropy_warning, 0.5 by default; off for other objectives) is a risk of policy collapse.

Each warning is given once per run, naming the step, what was seen and what to do.
"""

from __future__ import annotations

import math

from popo_megatron.metrics import RESTATED_PROBLEM, REWARD_REASONS

RESTATED_SHARE = 0.5
RESTATED_MIN_CORRECT = 8
HELDOUT_MARGIN = 0.15
HELDOUT_EVALS = 2
# A grade reason that must not be most of a step, and what it means.
UNREADABLE = {
    "bad_gold": "the data set's gold answers do not parse as math (check data.answer_key and the answers' "
    "format); those problems can never be rewarded",
    "parse_failure": "the extracted answers do not parse as math (read them with train.save_rollouts=true; check "
    "the prompt's answer-format instruction and reward.answer_fallbacks)",
}


class RunWatch:
    def __init__(self, entropy_floor: float = 0.0) -> None:
        self.entropy_floor = entropy_floor  # 0: no entropy warning
        self._warned: set[str] = set()
        self._rewards: list[float] = []  # train rewards since the last evaluation
        self._gaps = 0  # evaluations in a row above the train reward by the margin

    def step(self, record: dict) -> list[str]:
        """The warnings a step's metrics.jsonl record calls for."""
        self._rewards.append(record["reward_mean"])
        warnings = (self._restated(record), self._unreadable(record), self._entropy(record))
        return [w for w in warnings if w is not None]

    def _unreadable(self, record: dict) -> str | None:
        measured = record["all"]
        graded = sum(measured.get(metric.name, 0) for metric in REWARD_REASONS.values())
        for reason, what in UNREADABLE.items():
            count = measured.get(REWARD_REASONS[reason].name, 0)
            if graded and count > graded / 2:
                return self._once(
                    reason, f"step {record['step']}: {count:.0f} of {graded:.0f} grades are {reason}: {what}"
                )
        return None

    def _entropy(self, record: dict) -> str | None:
        entropy = record.get("entropy", float("nan"))
        if not self.entropy_floor or not math.isfinite(entropy) or entropy >= self.entropy_floor:
            return None
        return self._once(
            "entropy",
            f"step {record['step']}: the mean token entropy {entropy:.3f} is below {self.entropy_floor}: the policy "
            "may be collapsing onto few answers. Raise popo.beta_ent (the entropy bonus), or set "
            "popo.low_entropy_warning=0 where a confident policy is the goal",
        )

    def _restated(self, record: dict) -> str | None:
        measured = record["all"]
        correct, restated = measured.get("reward/correct", 0), measured.get(RESTATED_PROBLEM.name, 0)
        if correct >= RESTATED_MIN_CORRECT and restated >= RESTATED_SHARE * correct:
            return self._once(
                "restated",
                f"step {record['step']}: {restated:.0f} of the {correct:.0f} answers graded correct restate the "
                "problem (two or more of its numbers and an operator, e.g. \\boxed{31 + 88}), which math-verify "
                "evaluates: the reward may be earned without computing anything. Read the answers "
                "(train.save_rollouts=true) and grade literal numbers only (reward.require_literal=true)",
            )
        return None

    def heldout(self, step: int, avg_at_k: float) -> str | None:
        """The warning a held-out evaluation after `step` steps calls for, if any."""
        rewards, self._rewards = self._rewards, []
        if step == 0 or not rewards:
            return None
        train = sum(rewards) / len(rewards)
        self._gaps = self._gaps + 1 if avg_at_k > train + HELDOUT_MARGIN else 0
        if self._gaps >= HELDOUT_EVALS:
            return self._once(
                "heldout",
                f"after step {step}: held-out accuracy {avg_at_k:.3f} is above the train reward ({train:.3f} over "
                f"the last {len(rewards)} steps) by more than {HELDOUT_MARGIN} for {self._gaps} evaluations in a "
                "row. Unseen problems should not be easier than training ones: read what the held-out answers "
                "were rewarded for (train.save_rollouts=true writes them to OUTPUT_DIR/rollouts/)",
            )
        return None

    def _once(self, kind: str, message: str) -> str | None:
        if kind in self._warned:
            return None
        self._warned.add(kind)
        return message
