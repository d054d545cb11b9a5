"""HF <-> Megatron weight layouts: the mapping table (the one place that knows both), HF safetensors
reading and writing, and loading HF weights into a live model."""

from popo_megatron.weights.hf_checkpoint import HFCheckpoint
from popo_megatron.weights.load_hf import iter_megatron_shards, load_hf_model, load_hf_weights
from popo_megatron.weights.mapping import MappingError, ShardContext, WeightMap

__all__ = [
    "HFCheckpoint",
    "MappingError",
    "ShardContext",
    "WeightMap",
    "iter_megatron_shards",
    "load_hf_model",
    "load_hf_weights",
]
