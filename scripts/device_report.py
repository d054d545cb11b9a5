"""The device check's report: every part (its outcome against its time limit) and every test, from the
junit XML each pytest part writes or, where a part was killed before writing it, from its log's per-test
lines. Writes device_check.json and device_check.md into the work directory (argv[1]); argv[2] is 1 in dry
mode (the CPU tests were only collected). Exit status 1 when a test failed or a part did not finish."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PYTEST_PARTS = ("gpu", "cpu")
_VERBOSE_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def part_outcome(rc: int) -> str:
    return {0: "ok", 124: "timed out", -1: "not run"}.get(rc, "failed")


def read_parts(work: Path) -> list[dict]:
    parts = []
    for line in (work / "parts.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split()
        parts.append(
            dict(part=name, outcome=part_outcome(int(rc)), rc=int(rc), seconds=int(seconds), limit_s=int(limit))
        )
    return parts


def tests_from_xml(path: Path, part: str) -> list[dict]:
    rows = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (found.get("message") or "")[:200]
        name = f"{case.get('classname')}::{case.get('name')}"
        rows.append(dict(part=part, test=name, outcome=outcome, seconds=float(case.get("time") or 0), message=message))
    return rows


def tests_from_log(path: Path, part: str, collected: bool) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if collected and "::" in line and " " not in line.strip():
            rows.append(dict(part=part, test=line.strip(), outcome="collected", seconds=0.0, message=""))
        elif found := _VERBOSE_LINE.match(line):
            rows.append(dict(part=part, test=found[1], outcome=found[2].lower(), seconds=0.0, message="(from the log)"))
    return rows


def main(work: Path, dry: bool) -> int:
    parts = read_parts(work)
    tests = []
    for part in PYTEST_PARTS:
        xml = work / f"{part}.xml"
        collected = dry and part == "cpu"
        if xml.exists() and not collected:
            tests += tests_from_xml(xml, part)
        else:
            tests += tests_from_log(work / f"{part}.log", part, collected)
    versions_file, step_file = work / "versions.json", work / "gpu_step.json"
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
    step = json.loads(step_file.read_text()) if step_file.exists() else None
    (work / "device_check.json").write_text(
        json.dumps(dict(dry=dry, versions=versions, parts=parts, gpu_step=step, tests=tests), indent=1) + "\n"
    )
    lines = [
        f"# Device check{' (dry: CUDA tests skipped, CPU tests collected only)' if dry else ''}",
        "",
        " | ".join(f"{k} {v}" for k, v in versions.items()) or "(no versions: see versions.log)",
        "",
        (
            f"Training ({step['device']}, {step['params'] / 1e6:.0f}M parameters, sequence {step['seq']}): "
            f"{step['train_tokens_per_s']:,.0f} tokens/s, MFU {100 * step['mfu']:.1f}%. Twin EMA "
            f"{step['ema_gb_s']:.1f} GB/s, swap {step['swap_gb_s']:.1f} GB/s, device copy {step['copy_gb_s']:.1f} GB/s."
            if step
            else "bench/bench_gpu_step.py wrote no result (see gpu_step.log)."
        ),
        "",
        "| part | outcome | s | limit s |",
        "| --- | --- | --- | --- |",
        *(f"| {p['part']} | {p['outcome']} | {p['seconds']} | {p['limit_s']} |" for p in parts),
        "",
        "| part | test | outcome | s | message |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r['part']} | {r['test']} | {r['outcome']} | {r['seconds']:.1f} | {r['message']} |" for r in tests),
    ]
    (work / "device_check.md").write_text("\n".join(lines) + "\n")
    counts: dict[str, int] = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("device_check:", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    unfinished = [p for p in parts if p["outcome"] != "ok"]
    return 1 if unfinished or counts.get("failed") or counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2] == "1"))
