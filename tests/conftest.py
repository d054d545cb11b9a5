import os
import sys
from pathlib import Path

# Two pytest workers, each running one to three processes with OpenMP threads, share two cores: idle OpenMP
# threads that spin (libgomp's default) take the cores from those with work. Waiting passively, two
# single-rank step tests side by side took 30 s instead of 53 s. Set before torch is imported here, and
# inherited by the workers and every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# Fixtures shared with the benchmarks (public model shapes, large synthetic checkpoints).
sys.path.insert(1, str(Path(__file__).parents[1] / "bench"))

from tiny_models import VARIANTS, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, root) for name in VARIANTS}


@pytest.fixture(scope="session")
def arith_model(tmp_path_factory) -> Path:
    """The main job's tiny model (generated for the synthetic arithmetic task, seed 1234)."""
    from popo_megatron.data.synthetic import save_arithmetic_model

    return save_arithmetic_model(tmp_path_factory.mktemp("model") / "arith", seed=1234)


# `make test` runs on pytest-xdist workers (`--dist loadgroup`): tests go to whichever worker is free, except
# the modules below, each kept on one worker: their module fixtures are costly to build (a trained
# checkpoint, an exported model, SmolLM2) and would be built once per worker, and the Slurm tests share one
# test cluster.
ONE_WORKER_MODULES = {
    "test_convert",
    "test_convert_memory",
    "test_rollout_vllm",
    "test_slurm",
    "test_smollm2",
    "test_twin",
    "test_weight_sync_vllm",
}
# The longest tests start first, so that no worker is left with one of them at the end while the other idles.
LONGEST_FIRST = ("test_main_job_learns_and_its_target_follows_the_papers_law",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in LONGEST_FIRST)
