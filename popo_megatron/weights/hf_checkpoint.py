"""Hugging Face safetensors checkpoints: read tensor by tensor and slice by slice; write in shards.

Only the bytes of the slices asked for are read (safetensors memory-maps the
files), so a rank that owns 1/TP of a layer reads about 1/TP of it. The writer
holds at most one shard in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from popo_megatron.weights.mapping import MappingError, Sliceable

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsSlice:
    def __init__(self, handle, name: str) -> None:
        self._handle = handle  # keeps the file mapped while this slice is in use
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = _DTYPES[self._slice.get_dtype()]

    def __getitem__(self, index):
        return self._slice[index]


class HFCheckpoint:
    """Tensor name -> lazily sliceable tensor, over one or many safetensors files."""

    def __init__(self, hf_path: str | Path) -> None:
        self.path = Path(hf_path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MappingError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise MappingError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            self._file_of = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self._file_of.update({name: f for name in h.keys()})
        missing_files = sorted({str(f) for f in self._file_of.values() if not f.is_file()})
        if missing_files:
            raise MappingError(f"{self.path}: shard file(s) listed in the index are missing: {missing_files}")

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def get(self, name: str) -> Sliceable:
        if name not in self._file_of:
            raise MappingError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        # A fresh handle per tensor: the file's pages are unmapped when the slice is
        # dropped, so the checkpoint pages a rank touched do not accumulate in its
        # RSS over the whole load (opening costs a header parse, microseconds).
        return _SafetensorsSlice(safe_open(str(self._file_of[name]), framework="pt"), name)


class HFShardWriter:
    """Write named tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most
    `max_shard_bytes` (one `model.safetensors` when they fit), plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A private contiguous copy: safetensors refuses tensors that share storage.
        self._pending[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self._pending, str(self.out_dir / f"shard-{len(self._shards)}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
