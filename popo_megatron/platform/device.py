"""Device, backend and device-dependent Megatron settings: the platform seam.

Other modules ask this one what the machine can do instead of testing for
CUDA themselves.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from popo_megatron.config.schema import setting_value


def cuda_available() -> bool:
    return torch.cuda.is_available()


def dist_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def collective_device() -> torch.device:
    """Where tensors must be for the default backend's collectives (NCCL: this rank's GPU; gloo: host)."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def allocator_caches(device: torch.device) -> bool:
    """Whether torch keeps freed memory of `device` for its next allocations (CUDA's caching allocator). On
    CPU large blocks go back to the kernel when freed, and new ones cost a page fault per 4 KiB again."""
    return device.type == "cuda"


def transformer_engine_installed() -> bool:
    """Transformer Engine is importable (looked up, not imported: importing it is slow, and on a machine
    without CUDA a partial install breaks `import megatron.core`)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_layer_spec(choice: str) -> str:
    """'auto' -> 'te' with CUDA and Transformer Engine, else 'local' (torch modules); `choice` may be the
    config's str Enum. Config validation rejects 'te' without CUDA."""
    if choice == "auto":
        return "te" if cuda_available() and transformer_engine_installed() else "local"
    return setting_value(choice)


def transformer_config_device_kwargs(layer_spec: str) -> dict[str, Any]:
    """TransformerConfig flags that depend on the device and the layer implementation.

    The fused kernels exist only in Transformer Engine / Apex on CUDA; the local
    spec on CPU needs them all off and CPU-side weight initialisation.
    """
    fused = layer_spec == "te" and cuda_available()
    return dict(
        use_cpu_initialization=not cuda_available(),
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=fused,
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=False,
    )


def vllm_engine_kwargs(rollout_cfg: Any) -> dict[str, Any]:
    """vLLM `LLM(...)` settings that depend on the device.

    CUDA: a fraction of device memory, sleep mode (free the engine's memory
    while training), CUDA graphs unless the config says eager. CPU: an explicit
    KV-cache size (vLLM would otherwise size it from all of the machine's RAM),
    eager execution, no sleep mode (vLLM's CPU backend refuses it).
    """
    if cuda_available():
        return dict(
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            enable_sleep_mode=True,
            enforce_eager=rollout_cfg.enforce_eager,
        )
    return dict(kv_cache_memory_bytes=rollout_cfg.kv_cache_memory_mb * 2**20, enforce_eager=True)


def engine_can_sleep() -> bool:
    return cuda_available()


def release_cached_memory() -> str | None:
    """Before the colocated engine wakes: give the caching allocator's free blocks (what the backward pass
    left) back to the device, where vLLM's sleep-mode allocator can map them; otherwise the engine finds
    less memory than the trainer no longer uses. Returns the device's free memory as a line for the log
    (None on CPU, where freed memory goes back to the system by itself)."""
    if not cuda_available():
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free on the device"


def set_engine_threads(threads: int | None) -> None:
    """CPU: the OpenMP threads of an engine about to start (vLLM reads OMP_NUM_THREADS at start and then
    disables torch.set_num_threads for the whole process)."""
    if threads is not None and not cuda_available():
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
