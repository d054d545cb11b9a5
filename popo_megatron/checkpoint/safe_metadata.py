"""Read a distributed checkpoint's `.metadata` without running code from it.

torch's DCP reader unpickles `.metadata` with plain `pickle.load`: a checkpoint from elsewhere could run
anything when it is loaded. Before any checkpoint is read, its `.metadata` is unpickled here with an
unpickler that admits only what DCP writes (its metadata and planner classes, torch sizes, dtypes, layouts
memory formats and paths, and the one torch function that rebuilds a layout); anything else refuses the
checkpoint, naming the class, and nothing of it has run. DCP's own load of the same bytes is then safe.
The other files are read safely already: `common.pt` and the tensor shards with torch's weights-only load.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from popo_megatron.errors import UserError

_DCP_MODULES = ("torch.distributed.checkpoint.",)
# A path is what DCP stores as the checkpoint id when it was given one (a conversion does); building one runs
# nothing.
_PATHS = {("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), *_PATHS}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpointError(UserError):
    """A checkpoint's metadata would run code outside what a checkpoint holds."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if self._admitted(module, name) else None
        if found is None:
            raise UnsafeCheckpointError(
                f"{self.path}: unpickling it would load {module}.{name}, which no checkpoint holds: it was not "
                "written by torch's distributed checkpoint (or was altered), and it is not loaded"
            )
        return found

    @staticmethod
    def _admitted(module: str, name: str) -> bool:
        if (module, name) in _ALLOWED:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), _TORCH_VALUES)
        if module.startswith(_DCP_MODULES):  # classes only: a function there is not metadata
            import importlib

            return isinstance(getattr(importlib.import_module(module), name, None), type)
        return False


def check_dcp_metadata(path: Path) -> None:
    """Raise UnsafeCheckpointError unless `path` (a `.metadata`) holds only what DCP writes."""
    try:
        _DCPMetadataUnpickler(path.read_bytes(), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise UnsafeCheckpointError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from exc
