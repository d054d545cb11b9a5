"""Benchmark: math-verify reward throughput on MATH-500's answers, 1 vs 2 workers, and adversarial latency.

Responses are built from the 500 gold answers so that every one goes
through math-verify's parse and compare (none hits the identical-string
shortcut): "equivalent" boxes the gold answer followed by a LaTeX thin space
(\\,), which math-verify normalises away; "wrong" boxes the next problem's answer.
"adversarial" mixes one adversarial output (a million digits, 5000 nested
braces, a power tower) into every 25 responses. Worst-case latency is the
time to grade each adversarial output alone: it must stay within the
timeout plus the pool's grace.

    python bench/bench_reward.py [--timeout 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from popo_megatron.config import load_config
from popo_megatron.data.problems import load_problems
from popo_megatron.reward.math_verifier import MathVerifier
from popo_megatron.reward.pool import GRACE_S

ADVERSARIAL = {
    "million_digits": r"\boxed{" + "7" * 1_000_000 + "}",
    "nested_braces": r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "power_tower": r"\boxed{9^{9^{9^{9^{9}}}}}",
}


def workloads(golds: list[str]) -> dict[str, list[str]]:
    equivalent = [r"\boxed{" + g + r"\,}" for g in golds]
    wrong = [r"\boxed{" + golds[(i + 1) % len(golds)] + "}" for i in range(len(golds))]
    mixed = list(equivalent)
    bad = list(ADVERSARIAL.values())
    for n, i in enumerate(range(0, len(mixed), 25)):
        mixed[i] = bad[n % len(bad)]
    return {"equivalent": equivalent, "wrong": wrong, "adversarial": mixed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    ns = parser.parse_args()
    golds = [p.answer for p in load_problems("math500").problems]
    rows = []
    print(f"{'workload':12s} {'workers':>7s} {'samples':>7s} {'seconds':>8s} {'samples/s':>10s} {'vs 1 worker':>11s}")
    for name, responses in workloads(golds).items():
        single = None
        for workers in (1, 2):
            cfg = load_config(
                overrides=["model.hf_path=/x", f"reward.workers={workers}", f"reward.timeout_s={ns.timeout}"]
            )
            verifier = MathVerifier(cfg.reward)
            verifier.grade([r"\boxed{1}"] * workers, ["2"] * workers)  # start-up (imports) not counted
            start = time.perf_counter()
            grades = verifier.grade(responses, golds)
            seconds = time.perf_counter() - start
            verifier.close()
            rate = len(responses) / seconds
            single = single or rate
            reasons = {r: sum(g.reason == r for g in grades) for r in sorted({g.reason for g in grades})}
            rows.append(
                dict(
                    workload=name,
                    workers=workers,
                    samples=len(responses),
                    seconds=seconds,
                    rate=rate,
                    speedup=rate / single,
                    reasons=reasons,
                )
            )
            print(f"{name:12s} {workers:7d} {len(responses):7d} {seconds:8.2f} {rate:10.1f} {rate / single:11.2f}")
    print(f"\nworst case, one adversarial output alone (timeout {ns.timeout}s + grace {GRACE_S}s):")
    cfg = load_config(overrides=["model.hf_path=/x", "reward.workers=1", f"reward.timeout_s={ns.timeout}"])
    verifier = MathVerifier(cfg.reward)
    verifier.grade([r"\boxed{1}"], ["2"])
    latency = {}
    for name, response in ADVERSARIAL.items():
        start = time.perf_counter()
        (grade,) = verifier.grade([response], ["1"])
        latency[name] = {"seconds": time.perf_counter() - start, "reason": grade.reason}
        print(f"  {name:15s} {latency[name]['seconds']:6.2f}s  {grade.reason}")
    verifier.close()
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "reward.json"
    out.write_text(json.dumps({"timeout_s": ns.timeout, "throughput": rows, "adversarial_latency": latency}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
