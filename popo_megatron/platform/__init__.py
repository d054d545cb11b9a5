"""Platform layer: device/backend choice, distributed and parallel-state init, seeding,
and the CPU compatibility layer for megatron-core. The only place that knows about CPU vs GPU."""

from popo_megatron.platform.cpu_compat import apply_cpu_compat
from popo_megatron.platform.device import (
    collective_device,
    cuda_available,
    dist_backend,
    resolve_layer_spec,
    transformer_config_device_kwargs,
)
from popo_megatron.platform.distributed import (
    RankInfo,
    init_distributed,
    init_model_parallel,
    seed_everything,
    shutdown,
)

__all__ = [
    "RankInfo",
    "apply_cpu_compat",
    "collective_device",
    "cuda_available",
    "dist_backend",
    "init_distributed",
    "init_model_parallel",
    "resolve_layer_spec",
    "seed_everything",
    "shutdown",
    "transformer_config_device_kwargs",
]
