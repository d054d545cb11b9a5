"""Platform layer: device/backend choice, distributed and parallel-state init, seeding,
and the CPU compatibility layer for megatron-core. The only place that knows about CPU vs GPU."""

from popo_megatron.platform.cpu_compat import apply_compat
from popo_megatron.platform.device import (
    collective_device,
    cuda_available,
    dist_backend,
    engine_can_sleep,
    release_cached_memory,
    resolve_layer_spec,
    set_engine_threads,
    transformer_config_device_kwargs,
    vllm_engine_kwargs,
)
from popo_megatron.platform.distributed import (
    RankInfo,
    barrier,
    capture_rng_state,
    global_rank,
    init_distributed,
    init_model_parallel,
    restore_rng_state,
    seed_everything,
    shutdown,
    world_size,
)

__all__ = [
    "RankInfo",
    "apply_compat",
    "barrier",
    "capture_rng_state",
    "collective_device",
    "cuda_available",
    "dist_backend",
    "engine_can_sleep",
    "release_cached_memory",
    "global_rank",
    "init_distributed",
    "init_model_parallel",
    "resolve_layer_spec",
    "restore_rng_state",
    "seed_everything",
    "shutdown",
    "set_engine_threads",
    "transformer_config_device_kwargs",
    "vllm_engine_kwargs",
    "world_size",
]
