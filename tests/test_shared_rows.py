"""Rows gathered through memory that two local ranks share (platform/shared_rows), and the fallback to
collectives when a rank cannot map it. The weight stream over both transports is checked bit for bit in
test_convert."""

from __future__ import annotations

from unittest import mock

import torch

from popo_megatron.launch import run_local


def _exchange_worker() -> None:
    import torch.distributed as dist

    from popo_megatron.platform import shared_rows as module

    group = dist.group.WORLD
    rank, size = dist.get_rank(), dist.get_world_size()
    rows = module.shared_rows(group, 3 * 1024)
    assert rows is not None, "two ranks of one host map one file"
    dist.barrier()  # rank 0 unlinks the file after the others have mapped it
    assert not list(module.SHM_DIR.glob("popo-shared-rows-*")), "the file is unlinked once every rank mapped it"
    slots = []
    for step in range(4):  # four gathers: both slots, each written again after the other was read
        per_rank = rows.next_rows(7, torch.float64)
        per_rank[rank] = torch.arange(7.0) + 100 * rank + step
        rows.exchange()
        expected = torch.stack([torch.arange(7.0) + 100 * r + step for r in range(size)])
        assert torch.equal(per_rank, expected), f"rank {rank}, gather {step}: {per_rank}"
        slots.append(per_rank.data_ptr())
        dist.barrier()  # every rank has read this slot before it is written again
    assert slots[0] == slots[2] != slots[1] == slots[3], "two slots alternate"
    assert module.shared_rows(group, 1024) is rows, "slots big enough are kept: no new file per call"
    assert module.shared_rows(group, 4 << 20).slot_bytes >= 4 << 20, "bigger slots replace smaller ones"


def test_ranks_of_one_host_exchange_rows_through_shared_memory():
    run_local(_exchange_worker, 2)


def _no_room_worker() -> None:
    import torch.distributed as dist

    from popo_megatron.platform import shared_rows as module

    full = OSError(28, "No space left on device")
    # Only rank 1 finds /dev/shm full: every rank must fall back together, or their collectives would
    # no longer match.
    with mock.patch("os.posix_fallocate", side_effect=full if dist.get_rank() == 1 else None):
        assert module.shared_rows(dist.group.WORLD, 1024) is None
    dist.barrier()
    assert not list(module.SHM_DIR.glob("popo-shared-rows-*")), "the file of a failed attempt is removed"
    with mock.patch.object(module, "_map_shared_file", side_effect=AssertionError("tried again")):
        assert module.shared_rows(dist.group.WORLD, 1024) is None, "a group that cannot is not tried every call"


def test_a_rank_without_room_makes_every_rank_use_collectives():
    run_local(_no_room_worker, 2)
