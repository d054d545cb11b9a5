"""Offline checkpoint conversion: HF -> Megatron, Megatron -> HF, Megatron -> Megatron at another layout.

All three stream one parameter at a time through the mapping table's
whole-parameter form (`Transform.to_checkpoint` / `from_checkpoint`), without
building a model, so memory stays at a few tensors whatever the model size.
Everything is checked (tensors present, shapes, layout) before the first byte
is written, and the output appears under its final name only when complete
(see checkpoint_dir). Each function returns a small stats dict for the CLI and
the benchmarks.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from popo_megatron.checkpoint.format import (
    HF_DIR,
    INFO_FILE,
    MEGATRON_DIR,
    WEIGHT_PREFIXES,
    CheckpointError,
    CheckpointInfo,
    atomic_directory,
    checkpoint_directory,
    copy_hf_files,
    read_checkpoint,
)
from popo_megatron.convert.dcp_stream import Chunk, StoredTensors, write_chunks
from popo_megatron.logs import progress
from popo_megatron.model.hf_config import HFModelArgs, read_hf_config
from popo_megatron.platform import global_rank, world_size
from popo_megatron.weights.hf_checkpoint import HFCheckpoint, HFShardWriter, TensorSpec
from popo_megatron.weights.mapping import CheckpointParam, ShardContext, WeightMap

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose from {sorted(_DTYPES)}")
    return _DTYPES[name]


def _check_layout(args: HFModelArgs, hf_dir: Path, tp: int, pp: int, divisible_by: int) -> None:
    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config

    cfg = load_config(
        overrides=[
            f"model.hf_path={hf_dir}",
            f"model.make_vocab_size_divisible_by={divisible_by}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
        ]
    )
    validate_config(cfg, world_size=tp * pp, model=args)


def _split_among_ranks(chunks: list[Chunk]) -> list[Chunk]:
    """This rank's share: largest first to the least loaded rank (same answer on every rank)."""
    rank, world = global_rank(), world_size()
    load = [0] * world
    mine = []
    for chunk in sorted(chunks, key=lambda c: (-c.nbytes, c.key, c.offsets)):
        owner = load.index(min(load))
        load[owner] += chunk.nbytes
        if owner == rank:
            mine.append(chunk)
    return mine


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    rank = global_rank()
    bytes_bar = dict(unit="B", unit_scale=True, unit_divisor=1024)
    return progress(total=total, desc=desc, disable=not enabled, rank=rank, **bytes_bar)


def _load_meta_kernels() -> None:
    """torch loads its meta-device kernels (Python) at the first meta operation, ~0.8 s: start-up, which the
    plans on meta tensors need, done before a converter starts its clock (its `seconds` are the work's)."""
    torch.cat([torch.empty(1, device="meta")] * 2)


def _write_weights(
    tmp: Path,
    weight_sets: dict[str, Sequence[CheckpointParam]],
    whole_param: Callable[[str, CheckpointParam, bool], torch.Tensor],
    num_layers: int,
    desc: str,
    progress: bool,
    stored_as_is: Sequence[str] = (),
    stored: StoredTensors | None = None,
) -> int:
    """Plan every chunk from meta tensors (which validates the whole source), then write this rank's
    chunks. `weight_sets` maps a key prefix (a weight set's, or an optimiser state's) to its parameters,
    each computed by `whole_param(prefix, param, planning)`: with `planning`, from meta tensors of the
    sources' shapes and dtypes (nothing is read). `stored_as_is` are keys of `stored` copied whole (tensors
    that do not depend on the layout). Returns bytes written."""
    planned: dict[tuple[str, tuple[int, ...]], tuple[str, CheckpointParam | None]] = {}
    chunks = []
    for prefix, params in weight_sets.items():
        for p in params:
            meta = whole_param(prefix, p, True)
            shape, dtype = tuple(meta.shape), meta.dtype
            key = prefix + p.key
            if p.layer is None:
                chunk = Chunk(key, shape, (0,) * len(shape), shape, dtype)
            else:
                chunk = Chunk(key, (num_layers, *shape), (p.layer,) + (0,) * len(shape), (1, *shape), dtype)
            planned[(chunk.key, chunk.offsets)] = (prefix, p)
            chunks.append(chunk)
    for key in stored_as_is:
        shape = stored.shape(key)
        chunks.append(Chunk(key, shape, (0,) * len(shape), shape, stored.dtype(key)))
        planned[(key, chunks[-1].offsets)] = (key, None)
    mine = _split_among_ranks(chunks)
    bar = _progress(sum(c.nbytes for c in mine), desc, progress)

    def produce(chunk: Chunk) -> torch.Tensor:
        prefix, p = planned[(chunk.key, chunk.offsets)]
        bar.update(chunk.nbytes)
        if p is None:
            return stored.read(chunk.key)
        data = whole_param(prefix, p, False)
        return data if p.layer is None else data.unsqueeze(0)

    write_chunks(tmp / MEGATRON_DIR, mine, produce)
    bar.close()
    return sum(c.nbytes for c in chunks)


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
) -> dict:
    """Convert an HF safetensors model into a Megatron distributed checkpoint for TP x PP.

    Runs as one process or, under torch.distributed, with the work split among ranks.
    """
    _load_meta_kernels()
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    args = read_hf_config(hf_dir)
    _check_layout(args, hf_dir, tp, pp, make_vocab_size_divisible_by)
    source = HFCheckpoint(hf_dir)
    cast = _torch_dtype(dtype)
    ctx = ShardContext.create(args, 0, tp, make_vocab_size_divisible_by)

    def whole_param(_: str, p: CheckpointParam, planning: bool) -> torch.Tensor:
        sources = [source.get(name) for name in p.mapping.hf]
        if planning:
            sources = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in sources]
        full = p.mapping.transform.to_checkpoint(sources, ctx)
        return full.to(cast) if cast is not None else full

    params = WeightMap(args).checkpoint_params()
    dtype_name = str(cast or source.get(params[0].mapping.hf[0]).dtype).removeprefix("torch.")
    info = CheckpointInfo.for_layout(args, tp, pp, make_vocab_size_divisible_by, dtype_name, "weights", ["model"])
    with checkpoint_directory(out, hf_dir, info) as tmp:
        model = {WEIGHT_PREFIXES["model"]: params}
        nbytes = _write_weights(tmp, model, whole_param, args.num_layers, "hf-to-mcore", progress)
    return dict(bytes=nbytes, seconds=time.perf_counter() - start)


def _stored(ckpt: Path, info: CheckpointInfo, weight_sets: Sequence[str]) -> StoredTensors:
    info.require(weight_sets, ckpt)
    return StoredTensors(ckpt / MEGATRON_DIR)


def _stored_meta(stored: StoredTensors, key: str, p: CheckpointParam) -> torch.Tensor:
    """A meta tensor of what `stored.read(key, p.layer)` would return."""
    return torch.empty(stored.shape(key)[0 if p.layer is None else 1 :], dtype=stored.dtype(key), device="meta")


def _check_stored(stored: StoredTensors, key: str, ckpt: Path) -> None:
    if key not in stored:
        raise CheckpointError(f"{ckpt}: tensor {key!r} is missing from the Megatron checkpoint")


def mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    weights: str = "model",
    dtype: str | None = None,
    max_shard_bytes: int = 1024**3,
    progress: bool = True,
) -> dict:
    """Export a checkpoint's policy (`weights="model"`) or twin weights as an HF safetensors model."""
    _load_meta_kernels()
    start = time.perf_counter()
    ckpt = Path(ckpt)
    info, args = read_checkpoint(ckpt)
    stored = _stored(ckpt, info, [weights])
    cast = _torch_dtype(dtype)
    ctx = info.shard_context(args)
    params = WeightMap(args).checkpoint_params()
    prefix = WEIGHT_PREFIXES[weights]
    for p in params:
        _check_stored(stored, prefix + p.key, ckpt)
    keys = {prefix + p.key for p in params}
    specs = []
    for p in params:  # every output tensor's name, dtype and shape, from the stored metadata alone
        full = _stored_meta(stored, prefix + p.key, p)
        for name, tensor in zip(p.mapping.hf, p.mapping.transform.from_checkpoint(full, ctx), strict=True):
            specs.append(TensorSpec(name, cast or tensor.dtype, tuple(tensor.shape)))
    bar = _progress(sum(stored.nbytes(key) for key in keys) // world_size(), "mcore-to-hf", progress)
    with atomic_directory(out) as tmp:
        # Under torchrun the ranks share the shards: each reads the parameters its tensors come from.
        writer = HFShardWriter(tmp, specs, max_shard_bytes, global_rank(), world_size())
        for p in params:
            if not any(writer.owns(name) for name in p.mapping.hf):
                continue
            full = stored.read(prefix + p.key, p.layer)
            bar.update(full.numel() * full.element_size())
            for name, tensor in zip(p.mapping.hf, p.mapping.transform.from_checkpoint(full, ctx), strict=True):
                if writer.owns(name):
                    writer.add(name, tensor.to(cast) if cast is not None else tensor)
        writer.finish()
        if global_rank() == 0:
            copy_hf_files(ckpt / HF_DIR, tmp)
    bar.close()
    return dict(bytes=writer.total_bytes, seconds=time.perf_counter() - start)


def _training_state_prefixes(stored: StoredTensors, params: Sequence[CheckpointParam]) -> tuple[list[str], list[str]]:
    """A training checkpoint's other tensors: the prefixes of the optimiser's per-parameter states
    (megatron's fully_reshardable format stores each in model space, keyed like the parameter:
    `optimizer.state.exp_avg.model.<key>`), resharded by the parameter's own transform; and the keys copied
    as they are (the objective's head: replicated, the same at every layout). Anything else is refused: its
    layout is not known here."""
    param_keys = {p.key for p in params}
    weights = tuple(WEIGHT_PREFIXES.values())
    prefixes, as_is = set(), []
    for key in stored.keys():
        if key.startswith(weights):
            continue
        if key.startswith("predictor."):
            as_is.append(key)
            continue
        head, sep, param_key = key.partition(".model.")
        if not (key.startswith("optimizer.state.") and sep and param_key in param_keys):
            raise CheckpointError(f"{stored.path}: cannot reshard tensor {key!r}: its layout is not known")
        prefixes.add(head + sep)
    return sorted(prefixes), as_is


def _copy_training_files(ckpt: Path, tmp: Path) -> None:
    """What resuming reads beside the tensors (trainer state, RNG, the head's optimiser, megatron's
    non-sharded state): the same at any layout."""
    for path in ckpt.iterdir():
        if path.name not in (INFO_FILE, HF_DIR, MEGATRON_DIR):
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
    shutil.copy2(ckpt / MEGATRON_DIR / "common.pt", tmp / MEGATRON_DIR / "common.pt")


def mcore_reshard(ckpt: str | Path, out: str | Path, tp: int, pp: int, progress: bool = True) -> dict:
    """Rewrite a checkpoint for another TP x PP.

    Megatron loads a checkpoint at another layout directly unless the number of
    query groups (KV heads replicated for TP) or the vocab padding changes;
    this handles those cases too. A training checkpoint stays one: its optimiser
    state goes through the same transforms as the weights (replicated KV heads
    are rebuilt from one saved copy: the copies are kept equal in training), the
    rest is copied, and `popo train ... train.resume_from=OUT` continues it at the
    new layout.
    """
    _load_meta_kernels()
    start = time.perf_counter()
    ckpt = Path(ckpt)
    info, args = read_checkpoint(ckpt)
    divisible_by = info.make_vocab_size_divisible_by
    _check_layout(args, ckpt / HF_DIR, tp, pp, divisible_by)
    stored = _stored(ckpt, info, info.weights)
    src = info.shard_context(args)
    dst = ShardContext.create(args, 0, tp, divisible_by)
    params = WeightMap(args).checkpoint_params()
    prefixes = [WEIGHT_PREFIXES[weight_set] for weight_set in info.weights]
    as_is: list[str] = []
    if info.kind == "train":
        optimizer_prefixes, as_is = _training_state_prefixes(stored, params)
        prefixes += optimizer_prefixes
    for prefix in prefixes:
        for p in params:
            _check_stored(stored, prefix + p.key, ckpt)

    def whole_param(prefix: str, p: CheckpointParam, planning: bool) -> torch.Tensor:
        key = prefix + p.key
        full = _stored_meta(stored, key, p) if planning else stored.read(key, p.layer)
        return p.mapping.transform.to_checkpoint(p.mapping.transform.from_checkpoint(full, src), dst)

    resharded = CheckpointInfo.for_layout(args, tp, pp, divisible_by, info.dtype, info.kind, info.weights)
    with checkpoint_directory(out, ckpt / HF_DIR, resharded) as tmp:
        sets = {prefix: params for prefix in prefixes}
        nbytes = _write_weights(
            tmp, sets, whole_param, args.num_layers, "mcore-reshard", progress, stored_as_is=as_is, stored=stored
        )
        if info.kind == "train" and global_rank() == 0:
            _copy_training_files(ckpt, tmp)
    return dict(bytes=nbytes, seconds=time.perf_counter() - start)
