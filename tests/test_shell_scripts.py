"""Every shell script of the repository (Slurm jobs, setup and device-check scripts) parses and passes
shellcheck."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPTS = sorted([*(ROOT / "slurm").glob("*.sbatch"), *(ROOT / "scripts").glob("*.sh"), ROOT / ".ci" / "run"])


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"train.sbatch", "setup.sh", "device_check.sh", "device_wheels.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: scripts/setup_system.sh installs it"
    proc = subprocess.run([shellcheck, "-S", "style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
