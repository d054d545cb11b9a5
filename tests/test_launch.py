"""A world started like plain `srun` (one process per task, Slurm's variables only) comes up and communicates."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import torch, torch.distributed as dist
from popo_megatron.platform import init_distributed
info = init_distributed(timeout_minutes=2)
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
print(f"rank {info.rank}/{info.world_size} local {info.local_rank} sum {value.item():.0f}")
dist.destroy_process_group()
"""


def test_plain_srun_tasks_form_a_world():
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    tasks = []
    for task in range(2):
        env = dict(
            base,
            SLURM_PROCID=str(task),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(task),
            SLURM_JOB_ID=str(os.getpid()),
            SLURM_STEP_NODELIST="localhost",
            OMP_NUM_THREADS="1",
        )
        tasks.append(subprocess.Popen([sys.executable, "-c", CODE], env=env, stdout=subprocess.PIPE, text=True))
    outputs = sorted(task.communicate(timeout=120)[0].strip() for task in tasks)
    assert [t.returncode for t in tasks] == [0, 0]
    assert outputs == ["rank 0/2 local 0 sum 3", "rank 1/2 local 1 sum 3"]
