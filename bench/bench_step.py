"""Benchmark: where a training step's time goes, POPO against GRPO, on one example (the real model by default).

Both algorithms run `popo train EXAMPLE` from the same start, seed and step budget, without held-out
evaluation and checkpoints. Per algorithm, over the steps after the first (no start-up costs): the median
seconds of each phase (rollout, reward, old log-probs, twin forward, update, weight sync) and of the step,
the rollouts and response tokens generated, and the response tokens trained on. POPO trains on its positives
only and GRPO (without a KL term) on the rollouts with a non-zero advantage, so the trained share of the
generated tokens is what each saves in the update, and the table shows where the time goes instead.

    python bench/bench_step.py                                  # SmolLM2-135M arithmetic, 4 steps each
    python bench/bench_step.py --example examples/tiny_cpu.yaml --steps 20

Prints a table and writes bench/results/step_phases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_train import PARTS as PHASES
from bench_train import ROOT, VARIANTS, run, step_phases

ALGORITHMS = ["popo", "grpo"]  # the bench_train variants: POPO's defaults and DAPO-style GRPO


def summarise(algorithm: str, records: list[dict], rollouts_per_step: int) -> dict:
    steady = records[1:]  # the first step pays one-off costs (compilation, allocator warm-up)
    per_phase = {p: statistics.median(step_phases(r)[p] for r in steady) for p in PHASES}
    generated = [r["response_len_mean"] * rollouts_per_step for r in steady]
    trained = [r["trained_tokens"] for r in steady]
    return dict(
        algorithm=algorithm,
        steps=len(records),
        step_s=statistics.median(r["time_step_s"] for r in steady),
        **{f"{p}_s": s for p, s in per_phase.items()},
        reward=statistics.mean(r["reward_mean"] for r in records),
        generated_tokens=statistics.mean(generated),
        trained_tokens=statistics.mean(trained),
        trained_share=sum(trained) / sum(generated),
        update_s_per_1k_trained=1000 * sum(step_phases(r)["update"] for r in steady) / max(1, sum(trained)),
    )


def report(rows: list[dict]) -> None:
    header = ["algorithm", "step s", *[f"{p} s" for p in PHASES], "generated tok", "trained tok", "trained %"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["algorithm"], f"{r['step_s']:.1f}", *[f"{r[p + '_s']:.1f}" for p in PHASES]]
        cells += [f"{r['generated_tokens']:.0f}", f"{r['trained_tokens']:.0f}", f"{100 * r['trained_share']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nshare of the step per phase:")
    for r in rows:
        shares = ", ".join(f"{p} {100 * r[p + '_s'] / r['step_s']:.0f}%" for p in PHASES)
        print(f"  {r['algorithm']}: {shares}; update {r['update_s_per_1k_trained']:.1f} s per 1k trained tokens")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=ROOT / "examples/smollm2_arithmetic.yaml")
    parser.add_argument("--steps", type=int, default=4, help="steps per algorithm (the first is not counted)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="step_phases")
    ns = parser.parse_args()
    if ns.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not counted)")
    from popo_megatron.config import load_config

    cfg = load_config(ns.example)
    rollouts_per_step = cfg.train.prompts_per_step * cfg.rollout.n
    no_eval = ("eval.data=null",)
    rows = []
    for algorithm in ALGORITHMS:
        with tempfile.TemporaryDirectory() as tmp:
            records, _, seconds = run(ns.example, algorithm, ns.seed, ns.steps, Path(tmp) / "run", no_eval)
        rows.append({**summarise(algorithm, records, rollouts_per_step), "wall_s": seconds})
        print(f"{algorithm}: {ns.steps} steps in {seconds:.0f}s", file=sys.stderr)
    report(rows)
    meta = dict(example=os.path.relpath(ns.example, ROOT), steps=ns.steps, seed=ns.seed, variants=VARIANTS)
    ns.out.mkdir(parents=True, exist_ok=True)
    out_json = ns.out / f"{ns.name}.json"
    out_json.write_text(json.dumps({**meta, "runs": rows}, indent=1) + "\n")
    print(f"\nwritten: {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
