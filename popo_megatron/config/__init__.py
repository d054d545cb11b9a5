"""The run's configuration: the typed schema with its defaults (schema.py), loading YAML and overrides
(load.py). Checking a config against the model and the world (validate.py) sits above data and reward,
whose limits it checks, so it is imported from its own module."""

from popo_megatron.config.load import ConfigError, load_config
from popo_megatron.config.schema import FP8Config, ModelConfig, ParallelConfig, RunConfig

__all__ = ["ConfigError", "FP8Config", "ModelConfig", "ParallelConfig", "RunConfig", "load_config"]
