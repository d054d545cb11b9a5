"""The GPU check's scripts cannot rot: they pass shellcheck, and scripts/device_check.sh runs here in its dry
mode (this project's .venv; the CUDA tests skipped, the CPU tests collected) and writes its report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPTS = [ROOT / "scripts" / "device_check.sh", ROOT / "scripts" / "device_wheels.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: scripts/setup_system.sh installs it"
    proc = subprocess.run([shellcheck, "-S", "style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dry_run_reports_every_check(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPTS[0]), "--dry", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "gpu.log").read_text()
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry"] and report["versions"]["megatron-core"] and report["versions"]["torch"]
    gpu = [r for r in report["tests"] if r["part"] == "gpu"]
    cpu = [r for r in report["tests"] if r["part"] == "cpu"]
    assert len(gpu) == 4 and all(r["outcome"] == "skipped" for r in gpu), gpu  # no CUDA here
    assert len(cpu) > 20 and all(r["outcome"] == "collected" for r in cpu)
    assert any("test_popo_step.py" in r["test"] for r in cpu)
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("\n| gpu |") == 4 and "megatron-core" in table
