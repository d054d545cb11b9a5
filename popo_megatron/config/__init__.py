from popo_megatron.config.load import ConfigError, load_config
from popo_megatron.config.schema import FP8Config, ModelConfig, ParallelConfig, PopoConfig
from popo_megatron.config.validate import validate_config

__all__ = [
    "ConfigError",
    "FP8Config",
    "ModelConfig",
    "ParallelConfig",
    "PopoConfig",
    "load_config",
    "validate_config",
]
