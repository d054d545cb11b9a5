"""Cross-field and model-dependent checks, run before any heavy work.

All problems are collected and reported together, each naming its key.
"""

from __future__ import annotations

from omegaconf import DictConfig

from popo_megatron.config.load import ConfigError
from popo_megatron.model.hf_config import HFModelArgs


def validate_config(
    cfg: DictConfig, world_size: int, model: HFModelArgs | None = None, cuda_available: bool | None = None
) -> None:
    """Raise ConfigError listing every problem of `cfg` for this world size and model
    (`cuda_available` defaults to what this machine has)."""
    if cuda_available is None:
        from popo_megatron.platform import cuda_available as machine_has_cuda

        cuda_available = machine_has_cuda()
    problems: list[str] = []
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if value < 1:
            problems.append(f"parallel.{key}={value}: must be >= 1")
    if cfg.model.make_vocab_size_divisible_by < 1:
        problems.append(f"model.make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by}: must be >= 1")
    if problems:  # the rules below divide by these
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    if world_size % (tp * pp) != 0:
        problems.append(
            f"parallel: world size {world_size} is not divisible by "
            f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}"
        )
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")

    spec = cfg.model.spec  # a str Enum: compares equal to its value
    if not cuda_available:
        if spec == "te":
            problems.append("model.spec=te needs CUDA and Transformer Engine; use 'auto' or 'local' on this machine")
        if cfg.model.fp8.enabled:
            problems.append("model.fp8.enabled=true needs CUDA and Transformer Engine (not available on this machine)")
    elif cfg.model.fp8.enabled and spec == "local":
        problems.append("model.fp8.enabled=true needs the Transformer Engine layer spec (model.spec=te or auto)")

    if model is not None:
        if model.num_attention_heads % tp != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the model's "
                f"{model.num_attention_heads} attention heads"
            )
        kv = model.num_kv_heads
        if kv % tp != 0 and tp % kv != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp}: the model's {kv} query groups (KV heads) can be "
                f"neither split across TP (TP must divide {kv}) nor replicated (TP must be a multiple of {kv})"
            )
        if model.num_layers % pp != 0:
            problems.append(
                f"parallel.pipeline_model_parallel_size={pp} does not divide the model's {model.num_layers} layers"
            )
        if model.hidden_size % tp != 0 or model.intermediate_size % tp != 0:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide hidden_size={model.hidden_size} "
                f"and intermediate_size={model.intermediate_size}"
            )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
