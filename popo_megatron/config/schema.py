"""Structured configuration: one dataclass per concern.

Every key a user can set lives here with its type and default. OmegaConf turns
these dataclasses into a typed schema, so YAML files and `key.sub=value`
overrides are checked against it (unknown keys and wrong types are rejected by
`popo_megatron.config.load`); cross-field and model-dependent rules live in
`popo_megatron.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ParamsDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LayerSpec(str, Enum):
    auto = "auto"  # Transformer Engine spec on CUDA, local (torch) spec otherwise
    te = "te"
    local = "local"


class FP8Format(str, Enum):
    hybrid = "hybrid"  # E4M3 forward, E5M2 backward (the usual training choice)
    e4m3 = "e4m3"


class FP8Recipe(str, Enum):
    delayed = "delayed"
    tensorwise = "tensorwise"
    blockwise = "blockwise"
    mxfp8 = "mxfp8"


class AmaxComputeAlgo(str, Enum):
    max = "max"
    most_recent = "most_recent"


@dataclass
class FP8Config:
    """Transformer Engine FP8 settings (GPU only; rejected on a machine without CUDA)."""

    enabled: bool = False
    format: FP8Format = FP8Format.hybrid
    recipe: FP8Recipe = FP8Recipe.delayed
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: AmaxComputeAlgo = AmaxComputeAlgo.max  # delayed scaling only
    fp8_weights: bool = False  # keep the parameters themselves in FP8 (TE fp8_model_init)


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory: config.json plus *.safetensors (sharded or not).
    hf_path: str = "???"
    params_dtype: ParamsDtype = ParamsDtype.float32
    # The vocabulary is padded to a multiple of lcm(this, TP) so that the padded
    # size does not change with TP whenever TP divides it (checkpoints reshard freely).
    make_vocab_size_divisible_by: int = 128
    spec: LayerSpec = LayerSpec.auto
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class PopoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
