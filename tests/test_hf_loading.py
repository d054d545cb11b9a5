"""Loading HF checkpoints into a real Megatron model: bad checkpoints fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest

from popo_megatron.launch import run_local
from popo_megatron.weights import MappingError


def _load(hf_path: str) -> None:
    from popo_megatron.config import load_config
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf_path}"])
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    load_hf_model(cfg)


def _error_cases(cases: list[tuple[str, str]]) -> None:
    for path, pattern in cases:
        with pytest.raises(MappingError, match=pattern):
            _load(path)


def test_bad_checkpoints_fail_with_clear_errors(tiny_models, tmp_path):
    src = tiny_models["qwen3"]
    # Weights of one model under the config of another (same family, other sizes).
    other = tmp_path / "other_model"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    # A shard listed in the index is missing.
    missing_shard = tmp_path / "missing_shard"
    shutil.copytree(src, missing_shard)
    index = json.loads((missing_shard / "model.safetensors.index.json").read_text())
    (missing_shard / sorted(set(index["weight_map"].values()))[-1]).unlink()
    # A tensor is absent from the index.
    missing_tensor = tmp_path / "missing_tensor"
    shutil.copytree(src, missing_tensor)
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (missing_tensor / "model.safetensors.index.json").write_text(json.dumps(index))

    run_local(
        _error_cases,
        1,
        [
            (str(other), r"gate_proj rows: expected size 128 along dim 0, checkpoint has shape \(96, 64\)"),
            (str(missing_shard), r"shard file\(s\) listed in the index are missing"),
            (str(missing_tensor), r"tensor 'model.layers.2.mlp.down_proj.weight' not found"),
        ],
    )
