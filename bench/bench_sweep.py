"""Benchmark: held-out curves of one example under sets of overrides, one seed each: how a setting of an
example was chosen (docs and example comments quote these files).

    python bench/bench_sweep.py --name main_job_tuning --steps 150 \\
        --set paper --set no_entropy popo.beta_ent=0 --set alpha1 popo.alpha=1

Each `--set NAME [key=value ...]` is one run of `popo train EXAMPLE` (seed `--seed`, `--steps` steps, its
held-out evaluations every `eval.every` steps); the JSON keeps every run's overrides and curve, and a
table prints held-out avg@k per evaluated step. Runs are written as they finish; `--resume` skips the
sets already in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_train import MAIN_JOB, ROOT, run_command

from popo_megatron.trainer.logbook import EVAL_JSONL, read_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=ROOT / MAIN_JOB)
    parser.add_argument("--set", dest="sets", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", required=True)
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args()
    path = ns.out / f"{ns.name}.json"
    runs = json.loads(path.read_text())["runs"] if ns.resume and path.exists() else []
    for name, *overrides in ns.sets:
        if any(r["name"] == name for r in runs):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            command = [*overrides, f"seed={ns.seed}", f"train.steps={ns.steps}", f"train.output_dir={out}"]
            seconds = run_command(ns.example, [*command, "train.checkpoint_every=0"])
            curve = [(h["step"], h["avg_at_k"]) for h in read_metrics(out / EVAL_JSONL)]
        runs.append(dict(name=name, overrides=overrides, curve=curve, wall_s=seconds))
        meta = dict(example=str(ns.example.relative_to(ROOT)), seed=ns.seed, steps=ns.steps)
        ns.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
        print(f"{name}: " + " ".join(f"{s}:{v:.3f}" for s, v in curve), flush=True)
    steps = [s for s, _ in runs[0]["curve"]]
    print("\n| set | overrides | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|" + " --- |" * (len(steps) + 2))
    for r in runs:
        values = dict(r["curve"])
        cells = [f"{values[s]:.3f}" if s in values else "-" for s in steps]
        print(f"| {r['name']} | {' '.join(r['overrides']) or '(the example)'} | " + " | ".join(cells) + " |")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
