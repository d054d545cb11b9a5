"""This process's memory, as the kernel reports it."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set size of this process image (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that over exec() from the parent,
    so a command started by a large launcher (pytest, a Python wrapper) would
    report the launcher's peak instead of its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (not Linux?)")
