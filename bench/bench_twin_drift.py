"""Benchmark: does the adaptive momentum law (an extension) hold the EMA target's drift at its target on the main job?

Runs `popo train examples/tiny_cpu.yaml` per seed with the adaptive law and, as the baseline in the same
run, with the paper's constant momentum tau (what the drift does when nothing controls it). Per run it reports
the share of updates with the momentum off its bounds, and the drift of the
second half (mean, and the share of steps within a factor 2 of the target).
Writes bench/results/twin_drift.json and twin_drift.png (drift, target and m
over steps).

    python bench/bench_twin_drift.py [--seeds 1 2 3] [--steps 60] [--out bench/results] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from popo_megatron.config import load_config
from popo_megatron.trainer.logbook import read_metrics

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_cpu.yaml"
SCHEDULES = {"adaptive": ["popo.target.schedule=adaptive"], "constant": ["popo.target.schedule=constant"]}


def run(seed: int, steps: int, out: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "popo_megatron", "train", str(EXAMPLE), f"seed={seed}", f"train.steps={steps}"]
    command += [f"train.output_dir={out}", "train.checkpoint_every=0", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return read_metrics(out / "metrics.jsonl")


def drift_summary(records: list[dict], target: float, m_min: float, m_max: float) -> dict:
    """What the tests check: m off its bounds, and the second half's drift against the target."""
    momenta = [r["twin_momentum"] for r in records]
    second = [r["drift"] for r in records[len(records) // 2 :] if r["drift"] == r["drift"]]
    return dict(
        off_bounds=sum(m_min + 1e-9 < m < m_max - 1e-9 for m in momenta) / len(momenta),
        drift_second_half=statistics.mean(second) / target,
        within_2x=sum(target / 2 <= d <= 2 * target for d in second) / len(second),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run (e.g. a target to try)")
    ns = parser.parse_args()
    momentum = load_config(EXAMPLE, ns.overrides).popo.target.adaptive
    print(f"adaptive law: {OmegaConf.to_yaml(momentum).strip().replace(chr(10), ', ')}")
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ns.schedules:
            extra = SCHEDULES[schedule]
            for seed in ns.seeds:
                records = run(seed, ns.steps, Path(tmp) / f"{schedule}_{seed}", [*ns.overrides, *extra])
                curves[f"{schedule}_{seed}"] = {
                    "drift": [r["drift"] for r in records],
                    "momentum": [r["twin_momentum"] for r in records],
                }
                summary = drift_summary(records, momentum.d_target, momentum.m_min, momentum.m_max)
                rows.append(dict(schedule=schedule, seed=seed, **summary))
    print(f"\ntarget drift {momentum.d_target}; second half = steps {ns.steps // 2 + 1}-{ns.steps}")
    print(f"{'schedule':9s} {'seed':>4s} {'m off bounds':>12s} {'drift / target':>15s} {'steps within 2x':>16s}")
    for r in rows:
        print(
            f"{r['schedule']:9s} {r['seed']:4d} {r['off_bounds']:12.0%} {r['drift_second_half']:15.2f} "
            f"{r['within_2x']:16.0%}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    result = {"momentum": OmegaConf.to_container(momentum, enum_to_str=True), "runs": rows, "curves": curves}
    (ns.out / "twin_drift.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, momentum.d_target, ns.out / "twin_drift.png")
    print(f"\nwritten: {ns.out / 'twin_drift.json'}, {ns.out / 'twin_drift.png'}")
    return 0


def plot(curves: dict, target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    colors = {"adaptive": "tab:blue", "constant": "tab:gray"}
    for name, curve in curves.items():
        schedule = name.split("_")[0]
        steps = range(1, len(curve["drift"]) + 1)
        top.plot(steps, curve["drift"], color=colors[schedule], alpha=0.7, linewidth=1)
        bottom.plot(steps, curve["momentum"], color=colors[schedule], alpha=0.7, linewidth=1)
    top.axhline(target, color="black", linestyle="--", linewidth=1, label="d_target")
    top.fill_between([1, len(next(iter(curves.values()))["drift"])], target / 2, 2 * target, color="green", alpha=0.1)
    for schedule, color in colors.items():
        top.plot([], [], color=color, label=f"{schedule} momentum")
    top.set_yscale("log")
    top.set_ylabel("drift d (1 - cos)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("twin momentum m")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
