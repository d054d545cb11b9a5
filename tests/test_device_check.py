"""The GPU check cannot rot: scripts/device_check.sh runs here in its dry mode (this project's .venv; the CUDA
tests skipped, the CPU tests collected) and writes its report in one archive; under a budget too small for
its parts it still ends within the budget and reports what did not finish (shellcheck:
tests/test_shell_scripts.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
DEVICE_CHECK = ROOT / "scripts" / "device_check.sh"


def _dry_run(out: Path, budget_s: int) -> tuple[subprocess.CompletedProcess, float, dict]:
    env = dict(os.environ, POPO_DEVICE_BUDGET_S=str(budget_s))
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(DEVICE_CHECK), "--dry", str(out)], capture_output=True, text=True, timeout=budget_s + 60, env=env
    )
    wall = time.monotonic() - start
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz"], proc.stdout + proc.stderr
    with tarfile.open(out / "device_check.tar.gz") as archive:
        archive.extractall(out, filter="data")
    report = json.loads((out / "device_check" / "device_check.json").read_text())
    return proc, wall, report


def test_dry_run_reports_every_check(tmp_path):
    proc, wall, report = _dry_run(tmp_path, 540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert wall < 540
    assert report["dry"] and report["versions"]["megatron-core"] and report["versions"]["torch"]
    assert [p["part"] for p in report["parts"]] == ["versions", "gpu", "gpu_step", "cpu"]
    assert all(p["outcome"] == "ok" and p["seconds"] <= p["limit_s"] for p in report["parts"]), report["parts"]
    step = report["gpu_step"]  # the throughput bench ran on its tiny shape
    assert step["device"] == "cpu" and step["train_tokens_per_s"] > 0 and step["ema_gb_s"] > 0, step
    gpu = [r for r in report["tests"] if r["part"] == "gpu"]
    cpu = [r for r in report["tests"] if r["part"] == "cpu"]
    assert len(gpu) == 6 and all(r["outcome"] == "skipped" for r in gpu), gpu  # no CUDA here
    assert len(cpu) > 20 and all(r["outcome"] == "collected" for r in cpu)
    assert any("test_popo_step.py" in r["test"] for r in cpu)
    table = (tmp_path / "device_check" / "device_check.md").read_text()
    assert table.count("\n| gpu | tests") == 6 and "megatron-core" in table
    assert "device_check.tar.gz" in proc.stdout and "| gpu_step | ok |" in proc.stdout  # the report is printed


def test_a_budget_too_small_for_the_parts_still_ends_in_time_with_its_report(tmp_path):
    """The budget is what bounds the run: the part it runs out in is interrupted, the later ones are not
    started, and the report and archive still come (a kill used to lose the report)."""
    budget = 32  # 7 s for the parts after the reserves: the versions, and the gpu tests cut while importing
    proc, wall, report = _dry_run(tmp_path, budget)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert wall < budget + 5, wall
    outcomes = {p["part"]: p["outcome"] for p in report["parts"]}
    assert "timed out" in outcomes.values() or "not run" in outcomes.values(), report["parts"]
    assert outcomes["versions"] == "ok"
    assert all(p["seconds"] <= p["limit_s"] + 10 for p in report["parts"]), report["parts"]
