"""Device, backend and device-dependent Megatron settings: the platform seam.

Other modules ask this one what the machine can do instead of testing for
CUDA themselves.
"""

from __future__ import annotations

from typing import Any

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def dist_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def collective_device() -> torch.device:
    """Where tensors must be for the default backend's collectives (NCCL: this rank's GPU; gloo: host)."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def resolve_layer_spec(choice: str) -> str:
    """'auto' -> 'te' with CUDA, 'local' (torch modules) without (`choice` may be
    the config's str Enum). Config validation rejects 'te' without CUDA."""
    if choice == "auto":
        return "te" if cuda_available() else "local"
    return str(getattr(choice, "value", choice))


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
