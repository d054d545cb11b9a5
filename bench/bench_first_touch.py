"""Benchmark: what making fresh memory resident costs, with 4 KiB pages and with huge pages (Linux).

The loading bench shows that a load into a freshly built model pays the first touch of its
parameters' memory. This one times that first touch alone, in one process, against the floor of
writing the same memory once it is resident:
- 4 KiB pages (torch's default allocation);
- huge pages (MADV_HUGEPAGE, what THP_MEM_ALLOC_ENABLE=1 asks of torch's allocator): the first
  allocation of the process, one right after freeing the previous one, and one after a pause.
  A VM whose kernel reports free pages to its host (`page_reporting` on its command line) hands
  blocks freed longer than about 2 s back, and touching them again costs the host's fault too.

    python bench/bench_first_touch.py [--mib 503] [--pause 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import sys
import time
from pathlib import Path

import torch

_MADV_HUGEPAGE = 14


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fill_4k(nbytes: int) -> tuple[float, float]:
    """First touch of a fresh torch allocation, then the same write again (resident)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    return _seconds(lambda: t.fill_(1)), _seconds(lambda: t.fill_(2))


def _fill_huge(nbytes: int) -> float:
    """First touch of a fresh anonymous mapping advised to use huge pages; unmapped after."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if libc.madvise(ctypes.addressof(ctypes.c_char.from_buffer(m)), nbytes, _MADV_HUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed: is THP compiled in?")
    seconds = _seconds(lambda: torch.frombuffer(m, dtype=torch.uint8).fill_(1))
    m.close()  # the tensor is gone with the lambda: nothing exports the buffer any more
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=503, help="memory per allocation (a TP=2 rank's parameters)")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between freeing and the next huge pages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ns = parser.parse_args()
    nbytes = ns.mib << 20
    cmdline = Path("/proc/cmdline").read_text().split()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    print(
        f"{ns.mib} MiB per allocation; THP: {thp}; page reporting: "
        f"{[a for a in cmdline if a.startswith('page_reporting')] or 'not on the command line'}"
    )

    rows: dict[str, list[float]] = {
        "resident write (floor)": [],
        "4 KiB pages": [],
        "huge pages, first in process": [],
        "huge pages, right after freeing": [],
        f"huge pages, after a {ns.pause:g} s pause": [],
    }
    rows["huge pages, first in process"].append(_fill_huge(nbytes))  # once: the process's first
    for _ in range(ns.repeats):
        first, resident = _fill_4k(nbytes)
        rows["4 KiB pages"].append(first)
        rows["resident write (floor)"].append(resident)
        _fill_huge(nbytes)
        rows["huge pages, right after freeing"].append(_fill_huge(nbytes))
        time.sleep(ns.pause)
        rows[f"huge pages, after a {ns.pause:g} s pause"].append(_fill_huge(nbytes))

    floor = min(rows["resident write (floor)"])
    print(f"\n{'write of fresh memory':34} {'seconds (each repeat)':>26} {'best GB/s':>10} {'best x floor':>12}")
    for name, seconds in rows.items():
        best = min(seconds)
        print(f"{name:34} {' '.join(f'{s:.3f}' for s in seconds):>26} {nbytes / best / 1e9:10.1f} {best / floor:12.1f}")
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "first_touch.json"
    out.write_text(json.dumps(dict(mib=ns.mib, pause_s=ns.pause, thp=thp, seconds=rows), indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
