"""Write and read Megatron's torch_dist checkpoint format one chunk at a time.

A Megatron distributed checkpoint (backend `torch_dist`) is a PyTorch DCP
directory (`.metadata` plus `*.distcp` files) with megatron's `metadata.json`
and `common.pt` beside it. Megatron's own `dist_checkpointing.save` needs the
whole sharded state dict in memory. The offline converters instead declare
every chunk up front (key, global shape, offsets, sizes, dtype) and produce
each chunk's data only when DCP writes it, one file per chunk, so memory holds
one chunk at a time however large the model. Reading fetches one rectangular
chunk of a stored tensor (e.g. one layer of a layer-stacked parameter). What
is written loads with megatron's `dist_checkpointing.load` at any TP/PP.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from popo_megatron.platform.torch_compat import narrow_tensor_by_index, saved_tensor_data

# Megatron's format marker (megatron.core.dist_checkpointing.core.CheckpointingConfig).
MEGATRON_FORMAT = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class Chunk:
    """A rectangular block of a stored tensor."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.sizes).numel() * torch.empty((), dtype=self.dtype).element_size()


class _ChunkSavePlanner(DefaultSavePlanner):
    """Plans the declared chunks and asks `produce` for each one's data as DCP writes it."""

    def __init__(self, chunks: Sequence[Chunk], produce: Callable[[Chunk], torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self._produce = produce

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        data = self._produce(chunk)
        if tuple(data.shape) != chunk.sizes or data.dtype != chunk.dtype:
            raise ValueError(
                f"{chunk.key} at {chunk.offsets}: produced {tuple(data.shape)} {data.dtype}, "
                f"planned {chunk.sizes} {chunk.dtype}"
            )
        return data.contiguous()


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns that it assumes single-process use without torch.distributed: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@contextmanager
def _without_crc32() -> Iterator[None]:
    """torch.save writes each chunk as a zip record with a CRC32 of its bytes, which torch.load does not check
    (a corrupted byte loads silently, tried with torch 2.13): computing it only costs time. Measured on a
    2.1 GB conversion, one process on 2 cores: 2.7 s with it, 1.6 s without."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _collective() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def write_chunks(path: Path, chunks: Sequence[Chunk], produce: Callable[[Chunk], torch.Tensor]) -> None:
    """Write a torch_dist checkpoint at `path` holding `chunks`, whose data `produce` returns.

    Collective when torch.distributed runs several ranks: every rank calls it
    with its own chunks (together they must cover each tensor exactly once).
    """
    path.mkdir(parents=True, exist_ok=True)
    # One thread, though 2 were 1.2x faster: DCP's writer threads beyond the first drop their exceptions (with
    # torch 2.13, the simulated disk-full error of tests/test_convert_errors.py was then not raised).
    writer = dcp.FileSystemWriter(path, single_file_per_rank=False)
    try:
        with _single_process_is_intended(), _without_crc32():
            dcp.save({}, storage_writer=writer, planner=_ChunkSavePlanner(chunks, produce), no_dist=not _collective())
    except CheckpointException as exc:
        # DCP wraps every rank's failure; surface a single one as itself (e.g. OSError: disk full).
        failures = list(exc.failures.values())
        if len(failures) == 1:
            raise failures[0][0] from None
        raise
    if not _collective() or dist.get_rank() == 0:
        (path / "metadata.json").write_text(json.dumps(MEGATRON_FORMAT))
        torch.save({}, path / "common.pt")  # megatron's non-sharded state: nothing


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads the requested block of each key into its destination tensor."""

    def __init__(self, requests: Mapping[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self._requests.items():
            local = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [local])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self._requests[read_item.dest_index.fqn][1]
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: the data is already in place


class StoredTensors:
    """The tensors of a torch_dist checkpoint directory: names, shapes, dtypes, and block reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._metadata = dcp.FileSystemReader(self.path).read_metadata()
        self._tensors = {key: md for key, md in self._metadata.state_dict_metadata.items() if hasattr(md, "chunks")}

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def nbytes(self, key: str) -> int:
        return torch.Size(self.shape(key)).numel() * self.dtype(key).itemsize

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or its block `index` along the leading (stacked-layers) axis."""
        shape = self.shape(key)
        offsets = (0,) * len(shape) if index is None else (index,) + (0,) * (len(shape) - 1)
        sizes = shape if index is None else shape[1:]
        dest = torch.empty(sizes, dtype=self.dtype(key))
        block = dest if index is None else dest.unsqueeze(0)
        if self._read_stored_chunk(key, offsets, block):
            return dest
        planner = _ChunkLoadPlanner({key: (offsets, block)})
        with _single_process_is_intended():
            dcp.load({}, storage_reader=dcp.FileSystemReader(self.path), planner=planner, no_dist=True)
        return dest

    def _read_stored_chunk(self, key: str, offsets: tuple[int, ...], block: torch.Tensor) -> bool:
        """Read a block that is exactly one stored chunk straight from its file into `block`: what the
        offline converters write (one chunk per layer) reads without DCP's planning, unpickling and copy.
        False (nothing read) for any other block, e.g. one a training checkpoint stores in TP shards."""
        md = self._tensors[key]
        for index, chunk in enumerate(md.chunks):
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(block.shape):
                info = self._metadata.storage_data[MetadataIndex(key, torch.Size(offsets), index)]
                break
        else:
            return False
        if getattr(info, "transform_descriptors", None):
            return False
        target = block.reshape(-1).view(torch.uint8).numpy()
        with open(self.path / info.relative_path, "rb") as f:
            start = saved_tensor_data(f, info.offset, info.length, target.nbytes)
            if start is None:
                return False
            f.seek(start)
            return f.readinto(target.data) == target.nbytes
