"""The on-disk layout of a popo checkpoint (converted weights or training state).

    CKPT_DIR/
      popo_checkpoint.json   what is inside and the layout it was written at (CheckpointInfo)
      hf/                    config.json, tokenizer and generation files of the source HF model
      megatron/              the Megatron distributed checkpoint (torch_dist)

Inside `megatron/` the policy weights live under the key prefix `model.` (as
`model.sharded_state_dict(prefix="model.")` names them) and the twin's under
`twin.`. Stored tensors are whole parameters (Megatron's checkpoints are
independent of TP/PP), with two exceptions recorded here: the vocabulary
padding and the number of query groups (KV heads are replicated when the model
has fewer of them than TP).

Every writer builds the directory under a sibling `.NAME.incomplete` and
renames it when complete, so a directory named CKPT_DIR is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from popo_megatron.checkpoint.durable import fsync_dir, fsync_tree
from popo_megatron.checkpoint.safe_metadata import check_dcp_metadata
from popo_megatron.errors import UserError
from popo_megatron.model.hf_config import HFModelArgs, read_hf_config
from popo_megatron.model.layout import megatron_query_groups, padded_vocab_size
from popo_megatron.platform import barrier, global_rank
from popo_megatron.weights.mapping import ShardContext

INFO_FILE = "popo_checkpoint.json"
HF_DIR = "hf"
MEGATRON_DIR = "megatron"
FORMAT_VERSION = 1
# Weight sets a checkpoint can hold -> their key prefix inside megatron/.
WEIGHT_PREFIXES = {"model": "model.", "twin": "twin."}
# Files of an HF model directory that are weights (everything else is copied as metadata).
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt"}


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete, or does not fit the request."""


@dataclass
class CheckpointInfo:
    kind: str  # "weights" (converted) or "train" (written by the trainer)
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    make_vocab_size_divisible_by: int
    padded_vocab_size: int
    query_groups: int  # Megatron's num_query_groups (> KV heads when they are replicated)
    dtype: str
    weights: list[str] = field(default_factory=lambda: ["model"])
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_layout(
        cls, args: HFModelArgs, tp: int, pp: int, divisible_by: int, dtype: str, kind: str, weights: list[str]
    ) -> "CheckpointInfo":
        """The info of a checkpoint of `args` written for TP x PP."""
        return cls(
            kind=kind,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            make_vocab_size_divisible_by=divisible_by,
            padded_vocab_size=padded_vocab_size(args.vocab_size, divisible_by, tp),
            query_groups=megatron_query_groups(args.num_kv_heads, tp),
            dtype=dtype,
            weights=list(weights),
        )

    def require(self, weight_sets: Iterable[str], ckpt_dir: Path) -> None:
        """Raise CheckpointError unless the checkpoint holds every one of `weight_sets`."""
        for weight_set in weight_sets:
            if weight_set not in self.weights:
                raise CheckpointError(
                    f"{ckpt_dir}: has no {weight_set!r} weights (it holds: {', '.join(self.weights)})"
                )

    def shard_context(self, args: HFModelArgs) -> ShardContext:
        """The context whose whole-parameter layout (`Transform.to_checkpoint`) the stored tensors have."""
        return ShardContext(args, 0, self.tensor_model_parallel_size, self.padded_vocab_size)


def write_info(ckpt_dir: Path, info: CheckpointInfo) -> None:
    (Path(ckpt_dir) / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")


def read_checkpoint(ckpt_dir: str | Path) -> tuple[CheckpointInfo, HFModelArgs]:
    """The checkpoint's info and model, with an error that says what is wrong with the directory."""
    ckpt_dir = Path(ckpt_dir)
    info_file = ckpt_dir / INFO_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if not info_file.is_file():
        hint = ""
        if ckpt_dir.name.endswith(".incomplete"):
            hint = " (an interrupted write: convert or save again)"
        elif (ckpt_dir / "config.json").is_file():
            hint = " (it looks like a Hugging Face model: convert it with `popo convert hf-to-mcore`)"
        raise CheckpointError(f"{ckpt_dir}: not a popo checkpoint, {INFO_FILE} is missing{hint}")
    try:
        raw = json.loads(info_file.read_text())
        info = CheckpointInfo(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{info_file}: unreadable checkpoint info: {exc}") from exc
    if info.format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{info_file}: format version {info.format_version} is newer than this popo-megatron "
            f"understands ({FORMAT_VERSION}): upgrade popo-megatron"
        )
    if not (ckpt_dir / MEGATRON_DIR / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir / MEGATRON_DIR}: the Megatron distributed checkpoint is missing")
    check_dcp_metadata(ckpt_dir / MEGATRON_DIR / ".metadata")  # before anything unpickles it
    return info, read_hf_config(ckpt_dir / HF_DIR)


def copy_hf_files(src: Path, dst: Path) -> None:
    """Copy an HF model directory's non-weight files (config, tokenizer, generation config)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; it becomes `out` only when the block completes.

    Collective under torch.distributed (rank 0 does the file-system work). A
    failure removes the temporary directory; a killed process leaves it as
    `.NAME.incomplete`, which never looks complete and the next write replaces.
    """
    out = Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out} already exists: remove it or choose another output directory")
    tmp = out.parent / f".{out.name}.incomplete"
    if global_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run
        tmp.mkdir(parents=True)
    barrier()
    try:
        yield tmp
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if global_rank() == 0:
        fsync_tree(tmp)  # every file and name durable before the complete name appears
        os.rename(tmp, out)
        fsync_dir(out.parent)
    barrier()


@contextmanager
def checkpoint_directory(out: str | Path, hf_source: str | Path, info: CheckpointInfo) -> Iterator[Path]:
    """A new popo checkpoint at `out`, written atomically (atomic_directory): yields the temporary directory
    with its info file, the HF model's config and tokenizer files (from `hf_source`) and an empty
    megatron/ in place, for the caller to fill. Collective under torch.distributed."""
    with atomic_directory(out) as tmp:
        if global_rank() == 0:
            (tmp / MEGATRON_DIR).mkdir()
            copy_hf_files(Path(hf_source), tmp / HF_DIR)
            write_info(tmp, info)
        barrier()
        yield tmp
