"""YAML + dotlist loading into the structured schema, with errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from popo_megatron.config.schema import RunConfig
from popo_megatron.errors import UserError


class ConfigError(UserError):
    """A configuration problem the user must fix; the message names the key and the reason."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    # OmegaConf appends its own "full_key: ..., object_type=..." lines; keep the first line.
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{key}: {reason}" if key else reason


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the schema defaults, an optional YAML file and `key.sub=value` overrides.

    Unknown keys and values of the wrong type raise ConfigError naming the
    file (or "command line") and the full key. Missing required values ("???")
    are reported too, so nothing heavy starts with an incomplete config.
    """
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError carries line/column in its message
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key.sub=value")
        try:
            cfg.merge_with_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            key, _, value = item.partition("=")
            reason = _describe(exc) if isinstance(exc, OmegaConfBaseException) else f"not valid YAML ({exc.problem})"
            # Values are read as YAML: {...} and [...] are a mapping and a list, not text.
            hint = f" (to pass text, quote it: {key}='\"{value}\"')" if value[:1] in "{[" else ""
            raise ConfigError(f"command line: {item!r}: {reason}{hint}") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required key(s) not set: {', '.join(missing)}")
    OmegaConf.set_readonly(cfg, True)
    return cfg
