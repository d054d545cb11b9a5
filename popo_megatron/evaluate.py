"""Evaluate a policy on a benchmark: k samples per problem, avg@k and pass@k, results as JSON.

    avg@k   the mean over problems of (correct samples / k): expected accuracy of one sample
    pass@k  the fraction of problems with at least one correct sample among k (the unbiased
            estimator 1 - C(n - c, k) / C(n, k) with n = k samples)

The engine is any rollout engine (a live one during training, or one started
on a checkpoint by `engine_for_checkpoint`); the verifier grades in its
process pool. Problems go to the engine in batches, with a progress bar.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from popo_megatron.data.problems import ProblemSet
from popo_megatron.data.prompts import TOO_LONG, fits_context, render_prompt
from popo_megatron.logs import progress as progress_bar
from popo_megatron.rollout.engine import RolloutEngine, SamplingSettings


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def avg_by_kind(kinds: list[str], correct: list[int], k: int) -> dict[str, float]:
    """avg@k of each kind of problem (Problem.kind; {} when the problems have none)."""
    totals: dict[str, list[int]] = {}
    for kind, right in zip(kinds, correct, strict=True):
        if kind:
            totals.setdefault(kind, []).append(right)
    return {kind: sum(values) / (k * len(values)) for kind, values in sorted(totals.items())}


def kinds_text(by_kind: dict[str, float]) -> str:
    """ "; by kind: add 0.450, multiply 0.000" (nothing without kinds)."""
    return "; by kind: " + ", ".join(f"{kind} {value:.3f}" for kind, value in by_kind.items()) if by_kind else ""


@dataclass
class ProblemRecord:
    source: str
    answer: str
    correct: int
    responses: list[str]
    reasons: list[str]
    extracted: list[str | None]  # the answer the grader read from each response


@dataclass
class EvalResult:
    benchmark: str
    k: int
    avg_at_k: float
    pass_at_k: float
    problems: int
    reasons: dict[str, int]
    seconds: float
    generated_tokens: int
    by_kind: dict[str, float] = field(default_factory=dict)  # avg@k per kind of problem (e.g. operation)
    records: list[ProblemRecord] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.benchmark}: avg@{self.k} {self.avg_at_k:.4f}  pass@{self.k} {self.pass_at_k:.4f}  "
            f"({self.problems} problems, {self.seconds:.1f}s){kinds_text(self.by_kind)}"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def evaluate(
    engine: RolloutEngine,
    problems: ProblemSet,
    tokenizer: Any,
    verifier: Any,
    data_cfg: DictConfig,
    sampling: SamplingSettings,
    k: int,
    seed: int = 0,
    batch_prompts: int = 64,
    progress: bool = True,
    context: int | None = None,
) -> EvalResult:
    """k samples per problem of `problems` from `engine`, graded by `verifier` (a MathVerifier); with the
    engine's `context`, a problem whose prompt does not fit it scores 0 (reason prompt_too_long)."""
    sampling = replace(sampling, n=k)
    records: list[ProblemRecord] = []
    reasons: Counter = Counter()
    tokens = 0
    start = time.perf_counter()
    bar = progress_bar(total=len(problems), desc=f"eval {problems.name}", unit="problem", disable=not progress)
    for first in range(0, len(problems), batch_prompts):
        batch = problems.problems[first : first + batch_prompts]
        prompts = [render_prompt(p.problem, tokenizer, data_cfg.prompt_template, data_cfg.instruction) for p in batch]
        # A prompt the engine's context cannot hold is scored as wrong (prompt_too_long), not sent: vLLM
        # would refuse the whole batch.
        sent = [i for i, prompt in enumerate(prompts) if context is None or fits_context(prompt, context)]
        generation = engine.generate([prompts[i] for i in sent], sampling, seed + first)
        tokens += generation.generated_tokens
        texts = [[tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in g] for g in generation.responses]
        grades = verifier.grade(
            [t for group in texts for t in group], [batch[i].answer for i in sent for _ in range(k)]
        )
        graded = {i: (texts[n], grades[n * k : (n + 1) * k]) for n, i in enumerate(sent)}
        for i, problem in enumerate(batch):
            if i not in graded:
                reasons[TOO_LONG] += k
                records.append(ProblemRecord(problem.source, problem.answer, 0, [], [TOO_LONG] * k, [None] * k))
                continue
            group, mine = graded[i]
            reasons.update(g.reason for g in mine)
            correct = sum(g.correct for g in mine)
            reasons_of, extracted = [g.reason for g in mine], [g.answer for g in mine]
            records.append(ProblemRecord(problem.source, problem.answer, correct, group, reasons_of, extracted))
        bar.update(len(batch))
    bar.close()
    return EvalResult(
        benchmark=problems.name,
        k=k,
        avg_at_k=sum(r.correct for r in records) / (k * len(records)),
        pass_at_k=sum(pass_at_k(k, r.correct, k) for r in records) / len(records),
        problems=len(records),
        reasons=dict(reasons),
        seconds=time.perf_counter() - start,
        generated_tokens=tokens,
        by_kind=avg_by_kind([p.kind for p in problems.problems], [r.correct for r in records], k),
        records=records,
    )


@contextmanager
def hf_model_dir(checkpoint: str | Path, weights: str = "model") -> Iterator[Path]:
    """An HF model directory for `checkpoint`: itself when it is one, else a temporary export of a popo
    checkpoint's policy (or twin) weights, removed afterwards (one process: not collective)."""
    from popo_megatron.checkpoint.format import INFO_FILE
    from popo_megatron.convert.offline import mcore_to_hf

    checkpoint = Path(checkpoint)
    if not (checkpoint / INFO_FILE).is_file():
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="popo-eval-") as tmp:
        out = Path(tmp) / "hf"
        mcore_to_hf(checkpoint, out, weights=weights, progress=False)
        yield out
