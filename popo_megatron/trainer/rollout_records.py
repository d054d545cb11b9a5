"""OUTPUT_DIR/rollouts/: every response of a step and what it was rewarded with (`train.save_rollouts`).

A reward the model can earn without solving the task shows in what was rewarded, not in the reward's
curve: these files are for reading the answers. One JSON object per response, one file per step
(`step_NNNNNN.jsonl`) and per held-out evaluation (`heldout_step_NNNNNN.jsonl`, after that many steps):

    step, group (the prompt's index in the step), trained (whether the step learned from the group: with
    data.dynamic_sampling the groups without a signal are dropped), source, gold, prompt_ids,
    response_ids, prompt, response (texts), reward, reason (the grade's), extracted (the answer the
    grader read, at most 200 characters), finish_reason ("stop" or "length"),
    and for a trained group: weight (POPO's w_i, 0 for negatives) or advantage (GRPO's), as the loss
    used them: 0 for a response that carries no token into the loss (loss.mask_truncated).

Only global rank 0 writes; every rank holds every group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from popo_megatron.trainer.rollouts import Group

ROLLOUTS_DIR = "rollouts"


def response_records(
    groups: Sequence[Group],
    tokenizer: Any,
    step: int,
    trained: Sequence[Group] | None = None,
    weights: torch.Tensor | None = None,
    key: str = "weight",
) -> list[dict]:
    """One record per response of `groups`. With `trained` (the groups the step learned from, a subset of
    `groups`) and `weights` ([their rows, in order], the loss's per-response weights), each record says
    whether its group was trained and, if it was, its weight under `key` ("weight" or "advantage")."""
    first_row = {id(group): i * len(group.responses) for i, group in enumerate(trained or [])}
    records = []
    for index, group in enumerate(groups):
        prompt = tokenizer.decode(group.prompt, skip_special_tokens=False)
        for position, (response, text, grade) in enumerate(
            zip(group.responses, group.texts, group.grades, strict=True)
        ):
            record = dict(
                step=step,
                group=index,
                source=group.problem.source,
                gold=group.problem.answer,
                prompt_ids=list(group.prompt),
                response_ids=list(response.token_ids),
                prompt=prompt,
                response=text,
                reward=grade.score,
                reason=grade.reason,
                extracted=grade.answer,
                finish_reason=response.finish_reason,
            )
            if trained is not None:
                record["trained"] = id(group) in first_row
                if record["trained"]:
                    record[key] = float(weights[first_row[id(group)] + position])
            records.append(record)
    return records


def write_records(output_dir: str | Path, name: str, records: list[dict]) -> Path:
    """OUTPUT_DIR/rollouts/NAME, one JSON object a line (replaced when a resumed run repeats a step)."""
    directory = Path(output_dir) / ROLLOUTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def step_file(step: int) -> str:
    return f"step_{step:06d}.jsonl"


def heldout_file(step: int) -> str:
    return f"heldout_step_{step:06d}.jsonl"
