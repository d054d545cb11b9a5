"""Benchmark: the paper's POPO, this project's earlier POPO, the paper's ablations, this project's extensions
one at a time, and three GRPOs, on the main job, judged on held-out problems; each method at its own
learning rate from the same grid.

Every run is `popo train examples/tiny_cpu.yaml` (or `--example`) with one seed (the seed also
generates the random model, so each seed is a different start), the same step
budget, and a variant's overrides (VARIANTS). The run evaluates itself on the
held-out split (`eval.*` of the example: avg@4 at T=0.6, every 25 steps).

With `--lr-grid`, each method (METHODS: the paper's POPO, the project's earlier POPO, each GRPO) first runs
on `--tuning-seed` at every rate of the grid; the rate with the best held-out accuracy at the end (the
mean of the last three evaluations) is the method's, and every variant of it (ablations and extensions use
their method's) runs on `--seeds` at that rate. No method is compared at another's tuned rate.

Reported per run and as mean / min / max over the seeds:

- held-out avg@k at fixed budgets (BUDGETS steps, and the end), next to the
  prompt-blind baseline; per kind of problem where the data has kinds;
- the first evaluated step at which held-out avg@k reaches TARGET;
- wall time of the run and of a step (median), and the step split into
  rollout, reward, old log-probs (the objective's forwards before the update), the target's forward,
  update (loss, backward, optimiser, EMA) and weight sync;
- the mean token entropy of the updates;
- a plot of held-out accuracy per variant (mean and min-max band over seeds).

    python bench/bench_train.py --lr-grid 3e-4 1e-3 3e-3               # the comparison (README, docs/algorithm.md)
    python bench/bench_train.py --variants popo grpo_trl --seeds 1 --name popo_vs_grpo
    python bench/bench_train.py --resume                               # after a stop: only the runs not yet done
    python bench/bench_train.py --example examples/smollm2_arithmetic.yaml --variants popo grpo_trl \
        --seeds 1234 1 --steps 10 --name smollm2_popo_vs_grpo          # the real model, hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from popo_megatron.trainer.logbook import EVAL_JSONL, read_metrics
from popo_megatron.trainer.rollout_records import ROLLOUTS_DIR

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB = "examples/tiny_cpu.yaml"  # relative to ROOT
TARGET = 0.8
BUDGETS = (100, 200)
PARTS = ["rollout", "reward", "old_logprobs", "twin_forward", "update", "sync"]
# The project's POPO before the authors' code was known (its defaults then, the main job's target law).
PROJECT_POPO = [
    "popo.weights=success_scaled",
    "popo.normalizer=all_tokens",
    "popo.is_bound.mode=clip",
    "popo.similarity=per_token",
    "popo.alpha=0.05",
    "popo.beta_ent=0",
    "popo.target.schedule=adaptive",
    "popo.target.tau=0.99",
    "popo.target.adaptive.d_target=0.04",
]
VANILLA_GRPO = ["algorithm=grpo", "grpo.eps_high=0.2", "grpo.kl_beta=0.04", "grpo.advantage_std=sample"]
TRL_GRPO = [  # the POPO authors' baseline (examples/tiny_cpu_grpo_trl.yaml)
    "algorithm=grpo",
    "grpo.eps_high=0.2",
    "grpo.kl_beta=0.01",
    "grpo.advantage_std=sample",
    "grpo.aggregation=sequence_mean",
]
# Each method's variants run at the method's tuned learning rate.
METHODS = {
    "popo": [],  # the paper's POPO: the example as it is
    "popo_project": PROJECT_POPO,
    "grpo_trl": TRL_GRPO,
    "grpo": ["algorithm=grpo"],  # DAPO-style (examples/tiny_cpu_grpo.yaml)
    "grpo_vanilla": VANILLA_GRPO,  # examples/tiny_cpu_grpo_vanilla.yaml
}
# variant -> (its method, its overrides on top of the method's)
VARIANTS = {
    **{method: (method, []) for method in METHODS},
    # the paper's ablations
    "popo_uniform": ("popo", ["popo.weights=uniform"]),
    "popo_alpha0": ("popo", ["popo.alpha=0"]),
    "popo_beta_ent0": ("popo", ["popo.beta_ent=0"]),
    "popo_frozen_target": ("popo", ["popo.target.tau=1"]),
    # this project's extensions, one at a time on the paper's POPO
    "popo+success_scaled": ("popo", ["popo.weights=success_scaled"]),
    "popo+all_tokens": ("popo", ["popo.normalizer=all_tokens"]),
    "popo+clip": ("popo", ["popo.is_bound.mode=clip"]),
    "popo+per_token": ("popo", ["popo.similarity=per_token"]),
    "popo+adaptive_momentum": ("popo", ["popo.target.schedule=adaptive", "popo.target.adaptive.d_target=0.04"]),
}
COLORS = [
    "tab:blue",
    "tab:orange",
    "tab:red",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
    "black",
    "gold",
    "navy",
    "lime",
]


def overrides_of(variant: str) -> list[str]:
    method, extra = VARIANTS[variant]
    return [*METHODS[method], *extra]


def run_command(example: Path, overrides: list[str]) -> float:
    """`popo train EXAMPLE OVERRIDES...` in its own process; its wall seconds (raises with its log's tail)."""
    command = [sys.executable, "-m", "popo_megatron", "train", str(example), *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def run(
    example: Path, variant: str, seed: int, steps: int, out: Path, extra: tuple[str, ...] = ()
) -> tuple[list[dict], list[dict], float]:
    """(metrics records, held-out evaluations, wall seconds) of one run (`extra`: more overrides)."""
    overrides = [*overrides_of(variant), *extra, f"seed={seed}", f"train.steps={steps}", f"train.output_dir={out}"]
    # train.save_rollouts: what was rewarded, of which summarise() keeps examples
    seconds = run_command(example, [*overrides, "train.checkpoint_every=0", "train.save_rollouts=true"])
    return read_metrics(out / "metrics.jsonl"), read_metrics(out / EVAL_JSONL), seconds


def rewarded_examples(out: Path, per_kind: int = 3) -> dict[str, list[dict]]:
    """What the run was rewarded for, to read: correct answers of its last step, and of its last held-out
    evaluation per kind of problem (the operation of arithmetic_words), each with its problem."""
    rollouts = out / ROLLOUTS_DIR

    def correct(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        keep = ("source", "gold", "response", "extracted")
        return [{k: r[k] for k in keep} for r in rows if r["reason"] == "correct"]

    steps = sorted(rollouts.glob("step_*.jsonl"))
    heldout = sorted(rollouts.glob("heldout_step_*.jsonl"))
    examples = {"train_last_step": correct(steps[-1])[: 2 * per_kind] if steps else []}
    by_kind: dict[str, list[dict]] = {}
    for row in correct(heldout[-1]) if heldout else []:
        kind = row["source"].split(":")[3] if row["source"].startswith("arithmetic_words:") else "all"
        if len(by_kind.setdefault(kind, [])) < per_kind:
            by_kind[kind].append(row)
    examples.update({f"heldout_end_{kind}": rows for kind, rows in sorted(by_kind.items())})
    return examples


def step_phases(record: dict) -> dict[str, float]:
    """One step's seconds per part; `update` is the train time less its extra forward passes."""
    return dict(
        rollout=record["time_rollout_s"],
        reward=record["time_reward_s"],
        old_logprobs=record["time_old_logprobs_s"],
        twin_forward=record["time_twin_forward_s"],
        update=record["time_train_s"] - record["time_old_logprobs_s"] - record["time_twin_forward_s"],
        sync=record["time_sync_s"],
    )


def breakdown(records: list[dict]) -> dict[str, float]:
    """Median share of each part of a step (steps after the first: no start-up costs)."""
    shares = {part: [] for part in PARTS}
    for r in records[1:]:
        for part, seconds in step_phases(r).items():
            shares[part].append(seconds / r["time_step_s"])
    result = {part: statistics.median(values) for part, values in shares.items()}
    result["step_s"] = statistics.median(r["time_step_s"] for r in records[1:])
    return result


def summarise(
    variant: str, seed: int, records: list[dict], heldout: list[dict], seconds: float, examples: dict | None = None
) -> dict:
    by_step = {h["step"]: h["avg_at_k"] for h in heldout}
    reached = next((h["step"] for h in heldout if h["avg_at_k"] >= TARGET), None)
    correct = sum(r["all"].get("reward/correct", 0) for r in records)
    entropies = [r["entropy"] for r in records if math.isfinite(r["entropy"])]
    return dict(
        variant=variant,
        seed=seed,
        start=by_step[0],
        **{f"at_{b}": by_step.get(b) for b in BUDGETS},
        end=heldout[-1]["avg_at_k"],
        prompt_blind=heldout[-1]["prompt_blind"],
        # avg@k per kind of problem (arithmetic_words: the operation) at the start and the end
        start_by_kind=heldout[0].get("by_kind", {}),
        end_by_kind=heldout[-1].get("by_kind", {}),
        steps_to_target=reached,
        wall_s=seconds,
        train_reward_last10=statistics.mean(r["reward_mean"] for r in records[-10:]),
        # How the run's train rewards were earned: the share of correct answers that restate the problem, and
        # the answers refused as expressions (reward.require_literal)
        restated_share=sum(r["all"].get("reward/restated_problem", 0) for r in records) / max(correct, 1),
        not_literal=sum(r["all"].get("reward/not_literal", 0) for r in records),
        # the mean token entropy of the updates (the paper's entropy bonus keeps it up)
        entropy=statistics.mean(entropies) if entropies else None,
        curve=[(h["step"], h["avg_at_k"]) for h in heldout],
        examples=examples or {},
        **breakdown(records),
    )


def final_score(run: dict) -> float:
    """A tuning run's score: the mean of its last three held-out evaluations (one is noisy)."""
    return statistics.mean(value for _, value in run["curve"][-3:])


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{statistics.mean(known):.3f} [{min(known):.3f}, {max(known):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=ROOT / MAIN_JOB, help="the config every variant starts from")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="default: the example's train.steps")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None, help="tune each method's rate on this grid")
    parser.add_argument("--tuning-seed", type=int, default=0, help="the seed the grid is run on (not in --seeds)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="train_comparison", help="file name of the JSON and the plot")
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in the JSON (same steps) and run only the rest"
    )
    ns = parser.parse_args()
    from popo_megatron.config import load_config

    steps = ns.steps or load_config(ns.example, ["model.hf_path=unused"]).train.steps
    if ns.lr_grid and ns.tuning_seed in ns.seeds:
        raise SystemExit(
            f"--tuning-seed {ns.tuning_seed} is also in --seeds: report on seeds the rate was not tuned on"
        )
    out_json = ns.out / f"{ns.name}.json"
    ns.out.mkdir(parents=True, exist_ok=True)
    example = os.path.relpath(ns.example, ROOT)
    meta = dict(
        example=example,
        steps=steps,
        seeds=ns.seeds,
        target=TARGET,
        budgets=BUDGETS,
        methods=METHODS,
        variants=VARIANTS,
        lr_grid=ns.lr_grid,
        tuning_seed=ns.tuning_seed if ns.lr_grid else None,
    )
    previous = _previous(out_json, example, steps) if ns.resume else {}
    done, tuning = previous.get("runs", []), previous.get("tuning", [])

    def save(**extra) -> None:  # after every run, so that --resume after a stop loses at most the run in flight
        out_json.write_text(json.dumps({**meta, **extra, "tuning": tuning, "runs": done}, indent=1) + "\n")

    def one(variant: str, seed: int, extra: list[str]) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            records, heldout, seconds = run(ns.example, variant, seed, steps, Path(tmp) / "run", tuple(extra))
            examples = rewarded_examples(Path(tmp) / "run")
        result = summarise(variant, seed, records, heldout, seconds, examples)
        print(
            f"{variant} seed {seed} {' '.join(extra)}: held-out {result['end']:.3f} after {steps} steps, {seconds:.0f}s"
        )
        return result

    rates: dict[str, float] = {}
    if ns.lr_grid:
        for method in dict.fromkeys(VARIANTS[v][0] for v in ns.variants):
            for lr in ns.lr_grid:
                if not any(t["variant"] == method and t["lr"] == lr for t in tuning):
                    tuning.append({**one(method, ns.tuning_seed, [f"optim.lr={lr}"]), "lr": lr})
                    save()
            tried = [t for t in tuning if t["variant"] == method and t["lr"] in ns.lr_grid]
            rates[method] = max(tried, key=final_score)["lr"]
        print("tuned rates: " + ", ".join(f"{m} {lr:g}" for m, lr in rates.items()))
    # Seed-major order: an interrupted bench has every variant on its first seeds, and slow drifts of
    # the machine fall on all variants alike.
    for seed in ns.seeds:
        for variant in ns.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in done):
                continue
            lr = rates.get(VARIANTS[variant][0])
            done.append({**one(variant, seed, [f"optim.lr={lr}"] if lr else []), "lr": lr})
            save(rates=rates)
    save(rates=rates)
    rows = [r for r in done if r["variant"] in ns.variants and r["seed"] in ns.seeds]
    report(rows, ns.variants, ns.seeds, steps)
    if tuning:
        print(
            "\nlearning-rate tuning (seed %d): held-out at the end, mean of the last three evaluations" % ns.tuning_seed
        )
        print(
            "| method | "
            + " | ".join(f"lr {lr:g}" for lr in ns.lr_grid)
            + " | chosen |\n|"
            + " --- |" * (len(ns.lr_grid) + 2)
        )
        for method, chosen in rates.items():
            scores = {t["lr"]: final_score(t) for t in tuning if t["variant"] == method}
            cells = [f"{scores[lr]:.3f}" if lr in scores else "-" for lr in ns.lr_grid]
            print(f"| {method} | " + " | ".join(cells) + f" | {chosen:g} |")
    curves = {v: [r["curve"] for r in rows if r["variant"] == v] for v in ns.variants}
    plot(curves, rows[0]["prompt_blind"], ns.out / f"{ns.name}.png")
    print(f"\nwritten: {out_json}, {ns.out / (ns.name + '.png')}")
    return 0


def _previous(path: Path, example: str, steps: int) -> dict:
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if (previous.get("example", MAIN_JOB), previous["steps"]) != (example, steps):
        raise SystemExit(
            f"{path} holds {previous['steps']}-step runs of {previous.get('example', MAIN_JOB)}, not {steps} of"
            f" {example}: drop --resume or pass another --name"
        )
    return previous


def report(rows: list[dict], variants: list[str], seeds: list[int], steps: int) -> None:
    """Markdown tables (the README's): held-out accuracy and time per variant, the winner of each column."""
    measured = [v for v in variants if any(r["variant"] == v for r in rows)]
    mine = {v: [r for r in rows if r["variant"] == v] for v in measured}
    budgets = [*BUDGETS, steps]
    keys = [f"at_{b}" for b in BUDGETS] + ["end"]

    def mean(variant: str, key: str) -> float:
        known = [r[key] for r in mine[variant] if r[key] is not None]
        return statistics.mean(known) if known else float("nan")

    def reach(variant: str) -> tuple[int, float]:  # seeds that reached TARGET (more is better), mean steps
        reached = [r["steps_to_target"] for r in mine[variant] if r["steps_to_target"] is not None]
        return len(reached), statistics.mean(reached) if reached else float("inf")

    header = ["variant", "lr", *[f"held-out at {b}" for b in budgets], f"steps to {TARGET}", "wall s", "step s"]
    header.append("entropy (highest)")
    print(f"\nheld-out avg@k: mean [min, max] over seeds {', '.join(map(str, seeds))}; steps to {TARGET} per seed")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for v in measured:
        cells = [_spread([r[k] for r in mine[v]]) for k in keys]
        cells.append("/".join("-" if r["steps_to_target"] is None else str(r["steps_to_target"]) for r in mine[v]))
        cells += [f"{mean(v, 'wall_s'):.0f}", f"{mean(v, 'step_s'):.2f}", f"{mean(v, 'entropy'):.3f}"]
        lr = mine[v][0].get("lr")
        print("| " + " | ".join([v, "-" if lr is None else f"{lr:g}", *cells]) + " |")
    best = [max(measured, key=lambda v, k=k: mean(v, k)) for k in keys]
    best.append(max(measured, key=lambda v: (reach(v)[0], -reach(v)[1])))
    best += [min(measured, key=lambda v: mean(v, "wall_s")), min(measured, key=lambda v: mean(v, "step_s"))]
    best.append(max(measured, key=lambda v: mean(v, "entropy")))
    print("| **winner** | | " + " | ".join(f"**{v}**" for v in best) + " |")
    print(f"\nprompt-blind baseline: {rows[0]['prompt_blind']:.3f}; start: {_spread([r['start'] for r in rows])}")
    kinds = sorted({k for r in rows for k in r.get("end_by_kind", {})})
    header = ["variant", "seed", "held-out start", "held-out end", *kinds, "restated share", "wall s"]
    print("\nevery run (per kind: held-out avg@k start -> end; restated share: correct train answers that restate")
    print("the problem)\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for r in rows:
        per_kind = [
            f"{r['start_by_kind'].get(k, float('nan')):.3f} -> {r['end_by_kind'].get(k, float('nan')):.3f}"
            for k in kinds
        ]
        cells = [r["variant"], str(r["seed"]), f"{r['start']:.3f}", f"{r['end']:.3f}", *per_kind]
        cells += [f"{r.get('restated_share', float('nan')):.2f}", f"{r['wall_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nstep time shares (median over steps; mean over seeds)")
    print("| variant | " + " | ".join(PARTS) + " |\n|" + " --- |" * (len(PARTS) + 1))
    for v in measured:
        print(f"| {v} | " + " | ".join(f"{mean(v, p):.1%}" for p in PARTS) + " |")


def plot(curves: dict[str, list[list[tuple[int, float]]]], prompt_blind: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (variant, runs), color in zip(curves.items(), COLORS, strict=False):
        steps = [s for s, _ in runs[0]]
        values = list(zip(*[[v for _, v in run] for run in runs], strict=True))
        ax.plot(steps, [statistics.mean(v) for v in values], color=color, label=f"{variant} ({len(runs)} seeds)")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.12)
    ax.axhline(prompt_blind, color="black", linestyle="--", label="best prompt-blind answer")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out avg@k")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
