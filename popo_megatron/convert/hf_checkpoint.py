"""Read-only access to a Hugging Face safetensors checkpoint, tensor by tensor and slice by slice.

Only the bytes of the slices asked for are read (safetensors memory-maps the
files), so a rank that owns 1/TP of a layer reads about 1/TP of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from popo_megatron.convert.mapping import MappingError, Sliceable

INDEX_FILE = "model.safetensors.index.json"


class _SafetensorsSlice:
    def __init__(self, handle, name: str) -> None:
        self._handle = handle  # keeps the file mapped while this slice is in use
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

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

    def get(self, name: str) -> Sliceable:
        if name not in self._file_of:
            raise MappingError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        # A fresh handle per tensor: the file's pages are unmapped when the slice is
        # dropped, so the checkpoint pages a rank touched do not accumulate in its
        # RSS over the whole load (opening costs a header parse, microseconds).
        return _SafetensorsSlice(safe_open(str(self._file_of[name]), framework="pt"), name)
