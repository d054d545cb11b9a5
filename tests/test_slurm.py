"""The Slurm scripts, and the multi-node rendezvous they rely on.

- Every script passes `bash -n` and shellcheck.
- Two torchrun agents with different node ranks on loopback (two "nodes", as train.sbatch starts them)
  form one world and train a step of the tiny config.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
EXAMPLE = ROOT / "examples" / "tiny_cpu.yaml"


def test_there_are_train_convert_and_eval_scripts():
    assert {p.name for p in SCRIPTS} == {"train.sbatch", "convert.sbatch", "eval.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: scripts/setup_system.sh installs it"
    proc = subprocess.run([shellcheck, "-S", "style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_on_loopback_form_one_world_and_train(tmp_path):
    from popo_megatron.data.synthetic import save_arithmetic_model

    model = save_arithmetic_model(tmp_path / "model", seed=3)
    out = tmp_path / "run"
    port = _free_port()
    agents = []
    for node in range(2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "popo_megatron",
            "train",
            str(EXAMPLE),
            f"model.hf_path={model}",
            f"train.output_dir={out}",
            "train.steps=1",
            "train.prompts_per_step=8",
            "rollout.n=4",
            "reward.workers=1",
        ]
        log = open(tmp_path / f"node{node}.log", "w")
        agents.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)))
    codes = [agent.wait(timeout=600) for agent in agents]
    logs = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace")[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    assert json.loads((out / "run_state.json").read_text())["complete"]
    ranks = sorted(p.name for p in (out / "checkpoints" / "step_000001" / "rng").iterdir())
    assert ranks == ["rank_0.pt", "rank_1.pt"], "one world of two ranks, one per node"
