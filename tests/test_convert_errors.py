"""Conversion errors: clear messages before anything is written, and no output that looks complete
after a failure."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from popo_megatron.checkpoint.format import CheckpointError, read_checkpoint
from popo_megatron.checkpoint.weights import check_loadable
from popo_megatron.cli import main
from popo_megatron.config import ConfigError
from popo_megatron.convert import offline
from popo_megatron.model.hf_config import read_hf_config
from popo_megatron.weights.mapping import MappingError


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not (out.parent / f".{out.name}.incomplete").exists()


def test_layout_the_model_cannot_take(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=3 does not divide the model's 4 attention heads"):
        offline.hf_to_mcore(tiny_models["qwen3"], out, tp=3, progress=False)
    assert _nothing_written(out)


def test_missing_shard(tiny_models, tmp_path):
    hf = shutil.copytree(tiny_models["llama"], tmp_path / "llama")
    shard = sorted(hf.glob("*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(MappingError, match=f"missing.*{shard.name}"):
        offline.hf_to_mcore(hf, out, progress=False)
    assert _nothing_written(out)


def test_weights_of_another_size(tiny_models, tmp_path):
    """config.json says one size, the tensors are another: caught while planning, before writing."""
    hf = shutil.copytree(tiny_models["qwen2_tied"], tmp_path / "qwen2")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(MappingError, match="gate_proj rows: expected size 128"):
        offline.hf_to_mcore(hf, out, progress=False)
    assert _nothing_written(out)


def test_failure_while_writing_leaves_nothing_that_looks_complete(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = offline.write_chunks

    def write_until_disk_full(path, chunks, produce):
        count = itertools.count()

        def produce_or_fail(chunk):
            if next(count) == 5:
                raise OSError("No space left on device (simulated)")
            return produce(chunk)

        real_write(path, chunks, produce_or_fail)

    monkeypatch.setattr(offline, "write_chunks", write_until_disk_full)
    with pytest.raises(OSError, match="simulated"):
        offline.hf_to_mcore(tiny_models["qwen3"], out, progress=False)
    assert _nothing_written(out)


def test_killed_conversion_is_not_mistaken_for_a_checkpoint(tiny_models, tmp_path):
    """A process killed mid-write leaves `.NAME.incomplete`: unreadable as a checkpoint, replaced by the next run."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.incomplete"
    (stale / "megatron").mkdir(parents=True)
    (stale / "megatron" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="interrupted"):
        read_checkpoint(stale)
    offline.hf_to_mcore(tiny_models["qwen3"], out, progress=False)
    assert not stale.exists()
    read_checkpoint(out)


def test_existing_output_is_never_overwritten(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc = main(["convert", "hf-to-mcore", "--hf", str(tiny_models["qwen3"]), "--out", str(out), "--quiet"])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_export_requests_that_do_not_fit_the_checkpoint(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "mcore"
    offline.hf_to_mcore(tiny_models["qwen3"], ckpt, progress=False)
    with pytest.raises(CheckpointError, match="has no 'twin' weights"):
        offline.mcore_to_hf(ckpt, tmp_path / "twin", weights="twin", progress=False)
    rc = main(["convert", "mcore-to-hf", "--ckpt", str(tiny_models["qwen3"]), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "looks like a Hugging Face model" in capsys.readouterr().err


def test_loading_a_checkpoint_of_another_model_names_the_difference(tiny_models, tmp_path):
    from popo_megatron.config import load_config

    ckpt = tmp_path / "mcore"
    offline.hf_to_mcore(tiny_models["qwen3"], ckpt, progress=False)
    info, ckpt_args = read_checkpoint(ckpt)
    llama = read_hf_config(tiny_models["llama"])
    cfg = load_config(overrides=[f"model.hf_path={tiny_models['llama']}"])
    with pytest.raises(CheckpointError, match="another model.*architecture: checkpoint 'Qwen3ForCausalLM'"):
        check_loadable(info, ckpt_args, llama, cfg, ckpt)


def test_a_damaged_safetensors_file_is_named(tiny_models, tmp_path):
    """A truncated shard (an interrupted download) and a file that is not safetensors at all are reported with
    the file, before any weight is read."""
    import shutil

    from popo_megatron.weights import HFCheckpoint

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_models["qwen3"], damaged)
    weight_map = json.loads((damaged / "model.safetensors.index.json").read_text())["weight_map"]
    name, shard_name = max(weight_map.items(), key=lambda item: (damaged / item[1]).stat().st_size)
    shard = damaged / shard_name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MappingError, match=f"{shard.name}.*truncated or damaged"):
        HFCheckpoint(damaged).get(name)
    shard.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MappingError, match=f"{shard.name}: not a readable safetensors file"):
        HFCheckpoint(damaged).get(name)
