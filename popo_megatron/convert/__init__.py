"""Weight layouts: the HF <-> Megatron mapping table and the loaders/exporters built on it."""

from popo_megatron.convert.hf_checkpoint import HFCheckpoint
from popo_megatron.convert.load_hf import iter_megatron_shards, load_hf_model, load_hf_weights
from popo_megatron.convert.mapping import MappingError, ShardContext, WeightMap

__all__ = [
    "HFCheckpoint",
    "MappingError",
    "ShardContext",
    "WeightMap",
    "iter_megatron_shards",
    "load_hf_model",
    "load_hf_weights",
]
