"""Hugging Face safetensors checkpoints: read tensor by tensor and slice by slice; write in shards.

Tensors are views of the files mapped into memory: only the bytes of the slices
used are read, once, so a rank that owns 1/TP of a layer reads about 1/TP of it
and copies it once, into its parameter. The writer
streams: headers first, then each tensor's bytes as it comes.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

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
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts, checked
    against the file's size: a damaged or truncated file is named here, not met as a crash while loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise MappingError(f"{path}: not a readable safetensors file ({exc}): re-download or re-export it") from exc
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES or max(entry.get("data_offsets", [data + 1])) > data:
            raise MappingError(
                f"{path}: tensor {name!r} is cut off or of an unknown type ({entry}): the file is truncated or "
                "damaged; re-download or re-export it"
            )
    return header, 8 + length


def _mapped(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of a safetensors file as a view of the file mapped into memory: slicing it reads nothing,
    copying from it reads the pages it needs (from the page cache, once), and the mapping goes with the
    last view, so pages a rank touched do not stay in its RSS for the whole load."""
    dtype = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # read-only on purpose: the checkpoint is never written through it
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin)
    return flat.view(shape)


def _plain_file_name(name: object) -> bool:
    """A file name of the directory itself: no path separator, not "." or "..", not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class HFCheckpoint:
    """Tensor name -> lazily sliceable tensor, over one or many safetensors files."""

    def __init__(self, hf_path: str | Path) -> None:
        self.path = Path(hf_path)
        index = self.path / INDEX_FILE
        self._headers: dict[Path, tuple[dict, int]] = {}  # read on first use, per file
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MappingError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
            outside = sorted({f for f in weight_map.values() if not _plain_file_name(f)})
            if outside:  # "../x", "/etc/x": the index may name files of this directory only
                raise MappingError(f"{index}: names shard files outside its directory: {outside[:3]}")
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise MappingError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            self._headers = {f: _read_header(f) for f in files}
            self._file_of = {name: f for f in files for name in self._headers[f][0]}
        missing_files = sorted({str(f) for f in self._file_of.values() if not f.is_file()})
        if missing_files:
            raise MappingError(f"{self.path}: shard file(s) listed in the index are missing: {missing_files}")

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def get(self, name: str) -> Sliceable:
        """The tensor as a zero-copy view of its file (see `_mapped`): a slice of it is read when used."""
        if name not in self._file_of:
            raise MappingError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        path = self._file_of[name]
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        header, data_start = self._headers[path]
        if name not in header:
            raise MappingError(f"{path}: tensor {name!r} is listed in the index but not in the file")
        return _mapped(path, header[name], data_start)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class HFShardWriter:
    """Write tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes` (one
    `model.safetensors` when they fit), plus the index, streaming.

    Every tensor's name, dtype and shape are declared up front (`specs`, in the order they will be written),
    so each shard's safetensors header is written before its data, and each tensor's bytes go to the file
    as it is produced: memory holds the tensor being written, never a shard. Several processes share the
    work by shard: process `rank` of `world` writes shards rank, rank + world, ... (`owns` says which tensors
    are its own) and rank 0 the index.
    """

    def __init__(
        self, out_dir: Path, specs: Sequence[TensorSpec], max_shard_bytes: int, rank: int = 0, world: int = 1
    ) -> None:
        self.out_dir = Path(out_dir)
        self._shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if self._shards[-1] and size + spec.nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(spec)
            size += spec.nbytes
        mine = range(rank, len(self._shards), world)
        self._queue = [(i, spec) for i in mine for spec in self._shards[i]]
        self._owned = {spec.name for _, spec in self._queue}
        self._rank = rank
        self._next = 0
        self._file = None
        self.total_bytes = sum(spec.nbytes for spec in specs)

    def _file_name(self, shard: int) -> str:
        if len(self._shards) == 1:
            return "model.safetensors"
        return f"model-{shard + 1:05d}-of-{len(self._shards):05d}.safetensors"

    def _open(self, shard: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self._shards[shard]:
            header[spec.name] = {
                "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.out_dir / self._file_name(shard), "wb")
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)

    def owns(self, name: str) -> bool:
        """Whether this process writes tensor `name`."""
        return name in self._owned

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next of this process's declared tensors."""
        if self._next >= len(self._queue):
            raise ValueError(f"{name}: more tensors than declared")
        shard, spec = self._queue[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(
                f"{name} {tensor.dtype} {tuple(tensor.shape)} written where {spec.name} {spec.dtype} {spec.shape} "
                "was declared"
            )
        if self._file is None:
            self._open(shard)
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the export is renamed into place
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Check every tensor of this process was written; rank 0 writes the index (several shards)."""
        if self._next != len(self._queue):
            raise ValueError(f"{len(self._queue) - self._next} declared tensor(s) were not written")
        if len(self._shards) == 1 or self._rank != 0:
            return
        weight_map = {spec.name: self._file_name(i) for i, shard in enumerate(self._shards) for spec in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
