"""Every use of torch's private modules, in one place.

Written against torch 2.13 (the CPU stack).
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import BinaryIO, Sequence

import torch


def narrow_tensor_by_index(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The block of `tensor` at `offsets` of `sizes`, a view. What DCP's default load planner does with a read
    item (`torch.distributed._shard._utils.narrow_tensor_by_index`, private); the offline checkpoint reader
    reads stored chunks straight into such views."""
    from torch.distributed._shard._utils import narrow_tensor_by_index as narrow

    return narrow(tensor, offsets, sizes)


class _FileSlice(io.RawIOBase):
    """`length` bytes of an open file from `offset`, as a file of its own (zipfile reads it)."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: pos, io.SEEK_CUR: self._pos + pos, io.SEEK_END: self._length + pos}[whence]
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def saved_tensor_data(f: BinaryIO, offset: int, length: int, nbytes: int) -> int | None:
    """Where the raw bytes of the one tensor `torch.save` wrote at `offset` (`length` bytes) of `f` start,
    when they are stored as one uncompressed record of `nbytes` (a contiguous tensor that owns its storage);
    None otherwise. torch.save's format is a zip archive with the storage's bytes in `<archive>/data/0`;
    DCP's FileSystemWriter writes each tensor that way (torch 2.13, SerializationFormat.TORCH_SAVE)."""
    try:
        archive = zipfile.ZipFile(_FileSlice(f, offset, length))
    except zipfile.BadZipFile:
        return None
    records = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
    data = [i for i in archive.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")]
    if len(records) != 1 or len(data) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    record = records[0]
    if record.file_size != nbytes:
        return None
    f.seek(offset + record.header_offset)
    local_header = f.read(30)
    if local_header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", local_header[26:30])
    return offset + record.header_offset + 30 + name_length + extra_length


def storage_use_count(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share `tensor`'s storage, itself included. torch has no public
    way to ask (`torch._C._storage_Use_Count`, private); the weight stream reuses memory when it is 1."""
    storage = tensor.untyped_storage()  # a Python handle, which holds one more reference while it lives
    return torch._C._storage_Use_Count(storage._cdata) - 1
