"""The GPU check cannot rot: scripts/device_check.sh runs here in its dry mode (this project's .venv; the CUDA
tests skipped, the CPU tests collected) and writes its report (shellcheck: tests/test_shell_scripts.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
DEVICE_CHECK = ROOT / "scripts" / "device_check.sh"


def test_dry_run_reports_every_check(tmp_path):
    proc = subprocess.run(
        ["bash", str(DEVICE_CHECK), "--dry", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "gpu.log").read_text()
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry"] and report["versions"]["megatron-core"] and report["versions"]["torch"]
    step = report["gpu_step"]  # the throughput bench ran on its tiny shape
    assert step["device"] == "cpu" and step["train_tokens_per_s"] > 0 and step["ema_gb_s"] > 0, step
    gpu = [r for r in report["tests"] if r["part"] == "gpu"]
    cpu = [r for r in report["tests"] if r["part"] == "cpu"]
    assert len(gpu) == 6 and all(r["outcome"] == "skipped" for r in gpu), gpu  # no CUDA here
    assert len(cpu) > 20 and all(r["outcome"] == "collected" for r in cpu)
    assert any("test_popo_step.py" in r["test"] for r in cpu)
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("\n| gpu |") == 6 and "megatron-core" in table
