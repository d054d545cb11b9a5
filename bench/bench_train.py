"""Benchmark: the trainer on the tiny CPU config: step-time breakdown, and variants compared on the synthetic task.

Every run is `popo train examples/tiny_cpu.yaml` with one seed (the seed also
generates the random model, so each seed is a different start) and a
variant's overrides (VARIANTS: POPO, GRPO with `algorithm=grpo`, POPO with the
`all_tokens` normaliser). Reported side by side over the seeds:

- the time of a step split into rollout, reward, old log-probs, twin forward,
  the rest of training (loss, backward, optimiser, twin EMA) and weight sync,
  as a share of the step (median over steps after the first);
- the mean reward of the last 10 steps, and the first step at which the
  10-step moving average of the reward reaches THRESHOLD;
- a plot of the reward curves (bench/results/NAME.png, NAME.json).

    python bench/bench_train.py [--variants popo grpo] [--seeds 1 2 3] [--steps 60] [--name popo_vs_grpo]
    python bench/bench_train.py --variants popo popo_all_tokens --name loss_normalizer
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from popo_megatron.trainer.logbook import moving_average, read_metrics

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_cpu.yaml"
THRESHOLD = 0.10
PARTS = ["rollout", "reward", "old_logprobs", "twin_forward", "update", "sync"]
VARIANTS = {
    "popo": [],
    "grpo": ["algorithm=grpo"],
    "popo_all_tokens": ["popo.loss_normalizer=all_tokens"],
    "popo_positive_tokens": ["popo.loss_normalizer=positive_tokens"],
}
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]


def run(variant: str, seed: int, steps: int, out: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "popo_megatron",
        "train",
        str(EXAMPLE),
        *VARIANTS[variant],
        f"seed={seed}",
        f"train.steps={steps}",
        f"train.output_dir={out}",
        "train.checkpoint_every=0",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return read_metrics(out / "metrics.jsonl")


def breakdown(records: list[dict]) -> dict[str, float]:
    """Median share of each part of a step (steps after the first: no start-up costs)."""
    shares = {part: [] for part in PARTS}
    for r in records[1:]:
        update = r["time_train_s"] - r["time_old_logprobs_s"] - r["time_twin_forward_s"]
        parts = dict(
            rollout=r["time_rollout_s"],
            reward=r["time_reward_s"],
            old_logprobs=r["time_old_logprobs_s"],
            twin_forward=r["time_twin_forward_s"],
            update=update,
            sync=r["time_sync_s"],
        )
        for part, seconds in parts.items():
            shares[part].append(seconds / r["time_step_s"])
    result = {part: statistics.median(values) for part, values in shares.items()}
    result["step_s"] = statistics.median(r["time_step_s"] for r in records[1:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["popo", "grpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="popo_vs_grpo", help="file name of the JSON and the plot")
    ns = parser.parse_args()
    curves: dict[str, list[list[float]]] = {variant: [] for variant in ns.variants}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in curves:
            for seed in ns.seeds:
                records = run(variant, seed, ns.steps, Path(tmp) / f"{variant}_{seed}")
                rewards = [r["reward_mean"] for r in records]
                curves[variant].append(rewards)
                reached = next((i + 1 for i, v in enumerate(moving_average(rewards)) if v >= THRESHOLD), None)
                rows.append(
                    dict(
                        variant=variant,
                        seed=seed,
                        start=sum(rewards[:5]) / 5,
                        last10=sum(rewards[-10:]) / 10,
                        steps_to_threshold=reached,
                        **breakdown(records),
                    )
                )
    print(
        f"{'variant':20s} {'seed':>4s} {'reward 1-5':>10s} {'last 10':>8s} {'steps to ' + str(THRESHOLD):>15s} "
        f"{'step s':>6s}  " + " ".join(f"{p:>12s}" for p in PARTS)
    )
    for r in rows:
        reached = "not reached" if r["steps_to_threshold"] is None else str(r["steps_to_threshold"])
        print(
            f"{r['variant']:20s} {r['seed']:4d} {r['start']:10.3f} {r['last10']:8.3f} {reached:>15s} "
            f"{r['step_s']:6.2f}  " + " ".join(f"{r[p]:12.1%}" for p in PARTS)
        )
    for variant in curves:
        mine = [r for r in rows if r["variant"] == variant]
        print(
            f"{variant}: mean of the last 10 steps over {len(mine)} seeds: "
            f"{statistics.mean(r['last10'] for r in mine):.3f}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / f"{ns.name}.json").write_text(
        json.dumps({"threshold": THRESHOLD, "runs": rows, "curves": curves}, indent=1) + "\n"
    )
    plot(curves, ns.out / f"{ns.name}.png")
    print(f"\nwritten: {ns.out / (ns.name + '.json')}, {ns.out / (ns.name + '.png')}")
    return 0


def plot(curves: dict[str, list[list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant, color in zip(curves, COLORS, strict=False):
        runs = [moving_average(r, 5) for r in curves[variant]]
        steps = range(1, len(runs[0]) + 1)
        mean = [statistics.mean(v) for v in zip(*runs, strict=True)]
        ax.plot(steps, mean, color=color, label=f"{variant} (mean of {len(runs)} seeds)")
        ax.fill_between(
            steps,
            [min(v) for v in zip(*runs, strict=True)],
            [max(v) for v in zip(*runs, strict=True)],
            color=color,
            alpha=0.15,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (5-step moving average)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
