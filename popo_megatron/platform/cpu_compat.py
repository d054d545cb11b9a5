"""Make megatron-core run on a machine without CUDA (CPU tensors, gloo).

megatron-core assumes CUDA in a handful of well-defined ways (measured on
0.16.1 under Python 3.11 and on 0.19.2 under Python 3.12, see the project's
cpu-platform notes). Each is one named patch below;
`apply_compat()` applies them all, once, when CUDA is absent. Two of them fix megatron-core itself in a case
that is not CPU-specific (torch's Adam, which megatron-core uses on GPU too without Apex or Transformer
Engine; sequence parallelism with the local layer spec): those (DEVICE_INDEPENDENT) apply on CUDA as well,
and each acts only in its case.
Every patch only changes behaviour that would otherwise raise ("Torch not
compiled with CUDA enabled", an assertion, a type check): nothing that works
on CPU is altered. Each has a test in tests/test_cpu_compat.py that fails
without it.

This is the only module in the code base that knows it may run on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import types
import warnings
from typing import Callable, Iterator

import torch

_APPLIED: set[str] = set()


# --- 1. torch.cuda.current_device() used as a placement device -------------------
def _patch_current_device() -> None:
    # ~250 call sites do `torch.empty(..., device=torch.cuda.current_device())`.
    torch.cuda.current_device = lambda: "cpu"


# --- 2/4. device="cuda" literals inside megatron modules ----------------------------
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


def _to_cpu_device(device):
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return "cpu"
    return device


class _HostStream:
    """The stream of host code: everything on it is already ordered, so waiting is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


class _CpuCudaNamespace(types.ModuleType):
    """`torch.cuda` as seen through the proxy: the CUDA RNG calls act on the CPU generator, and the current
    stream (megatron-core 0.19's DDP waits on it before every gradient reduction) is the host's."""

    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)
    manual_seed = staticmethod(torch.manual_seed)

    @staticmethod
    def current_stream(device=None) -> _HostStream:
        return _HOST_STREAM

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _CpuTorchProxy(types.ModuleType):
    """Stands in for `torch` inside one megatron module: tensor factories that ask
    for device="cuda" get "cpu", `torch.cuda`'s RNG is the CPU RNG; everything
    else is the real torch."""

    cuda = _CpuCudaNamespace()

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name in _FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return attr(*args, **kwargs)

            return factory
        return attr


_PROXY = _CpuTorchProxy()

# get_default_causal_mask (used whenever attention_mask is None) builds its mask on "cuda".
_CAUSAL_MASK_MODULES = ("megatron.core.transformer.utils",)
# Schedules (token counters), optimizers (found_inf, grad scaler, grad norm),
# DDP buffers and utils create small bookkeeping tensors on "cuda".
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)


def _proxy_torch_in(module_names: tuple[str, ...]) -> Callable[[], None]:
    def patch() -> None:
        for name in module_names:
            importlib.import_module(name).torch = _PROXY

    return patch


# --- 3. torch.cuda.synchronize() in the pipeline p2p code and DDP -------------------
def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


# --- Tensor.cuda() on tensors that are already where they should be ------------------
def _patch_tensor_cuda() -> None:
    # e.g. the tied output layer on the last pipeline stage (language_module), and
    # optimizer state loading: `t.cuda()` on a CPU-only build raises.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


# --- 5. sequence parallelism with the local (torch) norm -----------------------------
def _patch_sequence_parallel_norm() -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_popo_patched", False):
        return

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        # The norm is per token, so it is correct on a sequence shard; its weight
        # gradient is partial per TP rank and must be summed across TP, which
        # finalize_model_grads does for params marked `sequence_parallel`.
        unsharded = copy.copy(config)
        object.__setattr__(unsharded, "sequence_parallel", False)
        norm = original_new(cls, unsharded, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__._popo_patched = True
    torch_norm.WrappedTorchNorm.__new__ = __new__


# --- 6. parameter dtype checks against 'torch.cuda.*Tensor' type names --------------
_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, `t.type()` (no arguments) of a CPU float tensor reports the
    CUDA type name that megatron's optimizers compare against."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if args or kwargs:
            return result
        return _CPU_TO_CUDA_TYPE.get(result, result)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_cuda_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # Gradient clipping asserts fp32 grads by type name; optimizer.py imported the function by name.
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
    dist_opt = distrib_optimizer.DistributedOptimizer
    for owner, name in (
        (dist_opt, "_build_model_and_main_param_groups"),
        (dist_opt, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
    ):
        raw = owner.__dict__[name]
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(_with_cuda_type_names(raw.__func__)))
        else:
            setattr(owner, name, _with_cuda_type_names(raw))


# --- 7. the model-parallel RNG tracker needs the CUDA generator ---------------------
def _patch_rng_tracker() -> None:
    # Megatron forks a named RNG state around every dropout and weight init
    # (`get_cuda_rng_tracker().fork()`) and seeds those states in
    # model_parallel_cuda_manual_seed. On CPU the same bookkeeping runs on the CPU
    # generator, so seeding code is identical on both platforms.
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.torch = _PROXY
    mpu_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


# --- 8. the distributed optimiser's state "step" with torch's Adam --------------------
def _patch_optimizer_step_state() -> None:
    # Without Apex / Transformer Engine (so on CPU) the optimiser is torch's Adam, which keeps a "step"
    # tensor in every parameter's state. DistributedOptimizer.load_state_dict restores it as ONE tensor
    # shared by all parameters (Adam then increments it once per parameter: a resumed run's bias
    # correction jumps ahead), and the "fully_reshardable" format then copies every state key from the
    # per-parameter tensors, which carry no "step" (KeyError). Give each parameter its own restored step.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_set = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load = DistributedOptimizer.load_state_dict

    def own_steps(optimizer) -> None:
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            own_steps(self.optimizer)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original_set(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        own_steps(self.optimizer)
        return result

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    DistributedOptimizer.load_state_dict = load_state_dict


# The order matters only in that later patches may rely on earlier ones being in place.
PATCHES: dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "causal_mask": _proxy_torch_in(_CAUSAL_MASK_MODULES),
    "synchronize": _patch_synchronize,
    "cuda_literals": _proxy_torch_in(_CUDA_LITERAL_MODULES),
    "tensor_cuda": _patch_tensor_cuda,
    "sequence_parallel_norm": _patch_sequence_parallel_norm,
    "cuda_type_checks": _patch_cuda_type_checks,
    "rng_tracker": _patch_rng_tracker,
    "optimizer_step_state": _patch_optimizer_step_state,
}


# Patches of megatron-core's own behaviour in cases that arise on GPU too; they change nothing outside them
# (the norm only under sequence parallelism with the local spec, the step only for optimisers that keep one
# per parameter).
DEVICE_INDEPENDENT = ("sequence_parallel_norm", "optimizer_step_state")


def apply_compat() -> list[str]:
    """Apply every patch when CUDA is absent, the DEVICE_INDEPENDENT ones when it is present. Idempotent;
    returns the names applied by this call."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # expected on CPU (no TE/Apex kernels, no CUDA streams); otherwise printed by every rank
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
    applied = []
    for name, patch in PATCHES.items():
        if name not in _APPLIED and (on_cpu or name in DEVICE_INDEPENDENT):
            patch()
            _APPLIED.add(name)
            applied.append(name)
    return applied
