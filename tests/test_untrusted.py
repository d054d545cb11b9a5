"""Files from elsewhere are read without running or reaching outside them: a distributed checkpoint's
pickled `.metadata`, the `latest` marker, a safetensors index's file names. (Real checkpoints' metadata
passes the same check in every resume and conversion test.)"""

from __future__ import annotations

import json
import os
import pickle

import pytest

from popo_megatron.checkpoint.format import INFO_FILE, MEGATRON_DIR, CheckpointError, read_checkpoint
from popo_megatron.checkpoint.runs import latest_checkpoint
from popo_megatron.checkpoint.safe_metadata import UnsafeCheckpointError
from popo_megatron.weights.hf_checkpoint import HFCheckpoint
from popo_megatron.weights.mapping import MappingError


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_metadata_would_run_code_is_refused_before_it_runs(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / MEGATRON_DIR).mkdir(parents=True)
    info = dict(kind="train", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, dtype="float32")
    info |= dict(make_vocab_size_divisible_by=128, padded_vocab_size=128, query_groups=1)
    (ckpt / INFO_FILE).write_text(json.dumps(info))
    marker = tmp_path / "ran"
    (ckpt / MEGATRON_DIR / ".metadata").write_bytes(pickle.dumps({"state": _Payload(str(marker))}))
    with pytest.raises(UnsafeCheckpointError, match=r"would load posix\.system, which no checkpoint holds"):
        read_checkpoint(ckpt)
    assert not marker.exists(), "the payload ran"
    (ckpt / MEGATRON_DIR / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UnsafeCheckpointError, match="unreadable checkpoint metadata"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["../../elsewhere/step_000001", "/etc", "notes.txt"])
def test_latest_names_a_checkpoint_of_its_own_directory(tmp_path, name):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint of"):
        latest_checkpoint(tmp_path)


def test_a_safetensors_index_names_files_of_its_own_directory(tmp_path):
    index = {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MappingError, match="names shard files outside its directory"):
        HFCheckpoint(tmp_path)


@pytest.mark.parametrize("as_path", [True, False], ids=["path_id", "str_id"])
def test_metadata_torch_writes_passes_the_check(tmp_path, as_path):
    """Both ways DCP is given a checkpoint id (a conversion passes a Path, training a str) are admitted."""
    import torch
    import torch.distributed.checkpoint as dcp

    from popo_megatron.checkpoint.safe_metadata import check_dcp_metadata

    target = tmp_path / "dcp"
    dcp.save({"w": torch.ones(3, 2), "step": torch.tensor(4)}, checkpoint_id=target if as_path else str(target))
    check_dcp_metadata(target / ".metadata")
