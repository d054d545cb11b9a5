"""Rows that the ranks of a process group on one host gather through shared memory instead of gloo.

A gloo all-gather or broadcast between two local CPU ranks copies every byte twice through the kernel
(into a socket, out of it), and is 3.5-5x slower than a memcpy on our machines. Ranks on one host can
instead map one file in /dev/shm (as vLLM's CPU backend does for its TP collectives): each rank writes
its own row of a [group size, n] view, a barrier orders the writes before the reads, and every rank
then reads all rows where they lie. Nothing is copied to gather them.

Two slots alternate, so one barrier per gather is enough: a rank writes slot s again only after the
barrier of the gather in between, which every rank reaches after it has read slot s.

The file is created once per process and group and kept while the process runs (a trainer gathers every
step: mapping fresh memory each time would cost a page fault per 4 KiB). Its pages are reserved with
posix_fallocate, so a full /dev/shm is an error now, not a SIGBUS later. The file is unlinked as soon as
every rank has mapped it: nothing is left behind when a process dies. When any rank cannot map it
(another host, no /dev/shm, no room), every rank gets None and gathers through collectives instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from popo_megatron.logs import get_logger

SHM_DIR = Path("/dev/shm")
_ALIGN = 1 << 21  # slots start on 2 MiB boundaries: any dtype's view is aligned

log = get_logger("shared_rows")


class SharedRows:
    """Two slots of `slot_bytes` in memory every rank of `group` maps (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, buffer: torch.Tensor, slot_bytes: int) -> None:
        self.group = group
        self.slot_bytes = slot_bytes
        self._buffer = buffer
        self._next_slot = 0  # the same on every rank: all ranks gather the same sequence of buffers

    def next_rows(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A [group size, numel] view of the next slot; write this rank's row, then call `exchange`."""
        size = dist.get_world_size(self.group)
        nbytes = size * numel * dtype.itemsize
        if nbytes > self.slot_bytes:
            raise ValueError(f"{nbytes} bytes of rows do not fit a slot of {self.slot_bytes}")
        start = self._next_slot * self.slot_bytes
        self._next_slot ^= 1
        return self._buffer[start : start + nbytes].view(dtype).view(size, numel)

    def exchange(self) -> None:
        """Every rank's row of the current slot is written and may be read."""
        dist.barrier(group=self.group)


_held: SharedRows | None = None
_unavailable: dist.ProcessGroup | None = None  # a group whose ranks could not map a file: not tried again


def shared_rows(group: dist.ProcessGroup, slot_bytes: int) -> SharedRows | None:
    """Shared slots of at least `slot_bytes` for `group` (a gloo group: CPU tensors), or None on every rank
    when some rank cannot map them. Collective over `group` unless this process already holds big enough
    slots for it, or knows that it cannot."""
    global _held, _unavailable
    if _unavailable is group or dist.get_backend(group) != "gloo":  # NCCL and GPU memory: its own transports
        return None
    if _held is not None and _held.group is group and _held.slot_bytes >= slot_bytes:
        return _held
    _held = None  # a smaller or another group's mapping is released before the new one is made
    slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
    buffer, errors = _map_shared_file(group, 2 * slot_bytes)
    if errors:
        log.warning(f"the TP ranks gather weights through collectives: no shared memory ({errors[0]})")
        _unavailable = group
        return None
    _held = SharedRows(group, buffer, slot_bytes)
    return _held


def _map_shared_file(group: dist.ProcessGroup, nbytes: int) -> tuple[torch.Tensor | None, list[str]]:
    """This rank's mapping of a new file in /dev/shm that every rank of `group` maps, and the errors of
    the ranks that could not map it (the same list on every rank)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    created: list[tuple[str | None, str | None]] = [(None, None)]
    if rank == 0:
        created[0] = _create_file(nbytes)
    dist.broadcast_object_list(created, src=dist.get_global_rank(group, 0), group=group)
    path, error = created[0]
    buffer = None
    if path is not None:
        try:
            # Each rank reserves its share of the pages: the zeroing of new pages runs on every rank at once.
            share = -(-nbytes // size)
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, rank * share, max(0, min(share, nbytes - rank * share)))
            finally:
                os.close(fd)
            buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:  # torch.from_file raises RuntimeError when mmap fails
            error = f"rank {rank}: {exc}"
    errors: list[str | None] = [None] * size
    dist.all_gather_object(errors, error, group=group)
    if rank == 0 and path is not None:
        Path(path).unlink(missing_ok=True)  # every rank has mapped it or given up
    return buffer, [e for e in errors if e is not None]


def _create_file(nbytes: int) -> tuple[str | None, str | None]:
    """(path, None) of a new file of `nbytes` in /dev/shm, or (None, why not)."""
    path = SHM_DIR / f"popo-shared-rows-{os.urandom(8).hex()}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        return None, f"{path}: {exc}"
    try:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        path.unlink(missing_ok=True)
        return None, f"{path}: {exc}"
    finally:
        os.close(fd)
    return str(path), None
