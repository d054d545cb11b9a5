"""File-system steps that survive a crash or a power loss: a checkpoint is complete on disk before any name
points to it, and a directory is renamed out of sight before it is deleted.

A rename is atomic, but without an fsync of the files and of the directories that hold them a crash can
leave a complete-looking name over files that never reached the disk. Megatron's distributed checkpoint
fsyncs its own shard files (each writer its own); these helpers cover the rest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Every file and directory under `root`, and `root` itself."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(directory)


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a crash leaves the old or the new content."""
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory so that no crash leaves it half-deleted under its own name: it is renamed to a
    hidden `.NAME.deleting` first (which nothing reads, and `remove_leftovers` finishes)."""
    trash = path.parent / f".{path.name}.deleting"
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def remove_leftovers(directory: Path) -> list[str]:
    """Finish what a crash interrupted in `directory`: half-deleted (`.NAME.deleting`) directories.
    Returns their names."""
    left = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(".") and p.name.endswith(".deleting")]
    for path in left:
        shutil.rmtree(path)
    return [p.name for p in left]
