"""Process-group, Megatron parallel-state and RNG set-up for one rank.

Works under torchrun / srun+torchrun (reads RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), under plain srun (one task per rank: the same
read from Slurm's variables, see `slurm_environment`), and as a plain single
process (world of one).
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from popo_megatron.errors import UserError
from popo_megatron.platform.cpu_compat import apply_compat
from popo_megatron.platform.device import cuda_available, dist_backend


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rendezvous port under plain srun when MASTER_PORT is not set: fixed per job, so every task agrees.
SLURM_PORT_BASE = 29500


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[07-09,12],cpu1" -> "gpu07")."""
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if first is None:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}: set MASTER_ADDR")
    prefix, ranges = first.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torchrun's variables for a task started by srun without torchrun (empty when not under srun, or when
    a launcher already set them): RANK, WORLD_SIZE, LOCAL_RANK from the task's ids, MASTER_ADDR the step's
    first node, MASTER_PORT derived from the job id."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 10000),
    }


def init_distributed(timeout_minutes: float = 30.0) -> RankInfo:
    """Initialise torch.distributed from the launcher's environment (idempotent). Megatron-Core is not
    imported here (a second and a half per process): init_model_parallel sets it up."""
    # Upstream deprecation notices every rank would print: megatron-core calls
    # collectives and DCP functions that torch >= 2.13 renamed or deprecated, and
    # warns about its own default cuda_graph_scope in every TransformerConfig.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    if dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    os.environ.update(slurm_environment(dict(os.environ)))
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun")
    if cuda_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=dist_backend(),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return RankInfo(rank, world_size, local_rank)


def init_model_parallel(parallel: DictConfig) -> None:
    """Create Megatron's TP/PP/CP/DP groups for the config's `parallel` section
    (idempotent for the same layout). Validate the config first. Applies the CPU compatibility layer
    when there is no CUDA: every use of Megatron-Core goes through here first."""
    apply_compat()
    from megatron.core import parallel_state

    tensor_parallel = parallel.tensor_model_parallel_size
    pipeline_parallel = parallel.pipeline_model_parallel_size
    context_parallel = parallel.context_parallel_size
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel
            and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel
            and parallel_state.get_context_parallel_world_size() == context_parallel
        ):
            return
        raise RuntimeError("Megatron parallel state is already initialised with another layout")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    As in Megatron-LM, pipeline stages get distinct seeds (100 apart) so that
    their layers are not initialised identically; TP ranks get distinct
    model-parallel states from the tracker.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states, e.g. around a library that reseeds them.

    Only tensors and plain Python values, so a checkpoint of it loads with `torch.load(weights_only=True)`.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def shutdown() -> None:
    """Tear down Megatron groups and the process group (barrier first: avoids a
    rare SIGABRT at exit with gloo)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def global_rank() -> int:
    """This process's rank in the world (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Every rank waits for the others (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()
