"""The twin-parameter manager: theta_twin for exactly this rank's parameters.

POPO's siamese twin is a momentum (EMA) copy of the policy that the optimiser
never trains (docs/algorithm.md, section 3). It is stored shard-local, in the
layout the model already has, so no resharding is ever needed:

- TP / PP: the twin of a parameter has the shape of this rank's shard of it.
- DP: with Megatron's distributed optimiser, each data-parallel rank owns a
  contiguous slice of every gradient/parameter bucket (ZeRO-1), and keeps the
  twin of that slice only: P x bytes / (TP x PP x DP) per rank. Without it,
  the twin is whole on every data-parallel rank.

Operations:

- `update(m)` after each optimiser step: theta_twin <- m theta_twin + (1 - m) theta,
  with fused foreach ops when no cast or copy between devices is needed.
- `swapped_in()`: the twin's weights in the model for a no-grad forward, the
  online weights restored bit for bit afterwards. With the distributed
  optimiser, each rank writes its slice and the buckets are all-gathered over
  data-parallel ranks (as the optimiser does after a step); the backup is this
  rank's slice only. FP8 (Transformer Engine): the cached FP8 copies of the
  weights are marked stale on both sides of the swap (see `_refresh_fp8_caches`).
- `full_tensors()` / `load_full_tensors()`: the twin as whole (TP/PP-sharded)
  tensors, gathering the data-parallel slices, for a checkpoint
  (checkpoint/weights.py stores them under the key prefix `twin.`, keyed like
  the model's own weights, so the twin reloads at any other TP / PP / DP layout
  and exports to HF with `popo convert mcore-to-hf --weights twin`).

The same class holds a frozen copy (a reference policy for GRPO's KL) when
`update` is never called.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from popo_megatron.model.forward import unwrap_model
from popo_megatron.platform import collective_device, cuda_available
from popo_megatron.platform.megatron_compat import ddp_buckets, uses_distributed_optimizer

# Elements per piece when the EMA casts or moves data (bounds the temporaries).
_EMA_PIECE = 1 << 24


@dataclass(eq=False)
class _Segment:
    """A 1-D region of the live weights this rank keeps a twin of, and the twin."""

    online: torch.Tensor  # a view into the parameter(s)
    twin: torch.Tensor


@dataclass
class _ParamSpan:
    name: str
    param: torch.nn.Parameter
    start: int  # the parameter's flat range within its bucket
    end: int


@dataclass(eq=False)
class _Bucket:
    """A distributed-optimiser bucket: gathered over `group`; this rank owns `shard` and keeps its twin."""

    param_data: torch.Tensor  # the bucket's whole 1-D view of the parameter buffer
    group: dist.ProcessGroup
    shard: slice  # this rank's slice of the bucket (Megatron's shard_buffer layout)
    params: list[_ParamSpan]
    segment: _Segment


class TwinParams:
    """The twin of `model`'s parameters on this rank, initialised to the current weights."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> None:
        self.model = model
        self.dtype = dtype
        self.device = torch.device("cpu") if cpu_offload else next(model.parameters()).device
        inner = unwrap_model(model)
        if getattr(inner.config, "fp8_param", False):
            raise NotImplementedError(
                "a twin of FP8 parameters (model.fp8.fp8_weights=true) is not supported: its EMA and swap need "
                "high-precision weights; use FP8 compute with model.fp8.fp8_weights=false"
            )
        self._params = dict(inner.named_parameters())
        names = {id(p): n for n, p in self._params.items()}
        self.sliced = uses_distributed_optimizer(model)
        self._buckets: list[_Bucket] = []
        self._whole: dict[str, _Segment] = {}
        if self.sliced:
            for bucket in ddp_buckets(model):
                shard = bucket.rank_shard()
                spans = [_ParamSpan(names[id(p.param)], p.param, p.start, p.end) for p in bucket.params]
                segment = self._new_segment(bucket.param_data[shard])
                self._buckets.append(_Bucket(bucket.param_data, bucket.group, shard, spans, segment))
        else:
            for name, param in self._params.items():
                self._whole[name] = self._new_segment(param.data.view(-1))
        self._segments = [b.segment for b in self._buckets] or list(self._whole.values())
        # The EMA blends these in place with one foreach call; the others are cast or moved piece by piece.
        self._same_dtype_and_device: list[_Segment] = []
        self._cast_or_moved: list[_Segment] = []
        for s in self._segments:
            same = s.online.dtype == s.twin.dtype and s.online.device == s.twin.device
            (self._same_dtype_and_device if same else self._cast_or_moved).append(s)
        self._covered = sorted(self._whole) or sorted(span.name for b in self._buckets for span in b.params)

    def _new_segment(self, online: torch.Tensor) -> _Segment:
        twin = torch.empty(online.numel(), dtype=self.dtype, device=self.device, pin_memory=self._pin())
        twin.copy_(online)
        return _Segment(online, twin)

    def _pin(self) -> bool:
        return self.device.type == "cpu" and cuda_available()

    # --- EMA ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """theta_twin <- momentum * theta_twin + (1 - momentum) * theta, for this rank's slice."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        weight = 1.0 - momentum
        fast = self._same_dtype_and_device
        if fast:
            torch._foreach_lerp_([s.twin for s in fast], [s.online for s in fast], weight)
        for segment in self._cast_or_moved:
            # Cast / move in pieces, blending in fp32 (a bf16 twin is rounded once per update).
            for start in range(0, segment.twin.numel(), _EMA_PIECE):
                piece = slice(start, start + _EMA_PIECE)
                blended = segment.twin[piece].to(segment.online.device, torch.float32)
                blended.lerp_(segment.online[piece].float(), weight)
                segment.twin[piece].copy_(blended)

    # --- swapping the twin into the model ----------------------------------------------
    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model computes with the twin's weights (use it for no-grad forwards)."""
        backup_device = self.device if self.device.type == "cpu" else None
        with torch.no_grad():
            backups = [s.online.to(backup_device or s.online.device, copy=True) for s in self._segments]
            for segment in self._segments:
                segment.online.copy_(segment.twin, non_blocking=True)
            self._all_gather_buckets()
            _refresh_fp8_caches(self.model)
        try:
            yield
        finally:
            with torch.no_grad():
                for segment, backup in zip(self._segments, backups, strict=True):
                    segment.online.copy_(backup, non_blocking=True)
                self._all_gather_buckets()
                _refresh_fp8_caches(self.model)

    def _all_gather_buckets(self) -> None:
        for bucket in self._buckets:
            if bucket.group.size() > 1:
                dist.all_gather_into_tensor(bucket.param_data, bucket.param_data[bucket.shard], group=bucket.group)

    # --- checkpoints --------------------------------------------------------------------
    @torch.no_grad()
    def full_tensors(self) -> dict[str, torch.Tensor]:
        """The twin of every parameter, shaped like this rank's (TP/PP) shard of it, on the twin's device.

        Collective over data-parallel ranks when the twin is sliced."""
        if not self.sliced:
            return {name: s.twin.view_as(self._params[name]) for name, s in self._whole.items()}
        full = {}
        for bucket in self._buckets:
            gathered = torch.empty(bucket.param_data.numel(), dtype=self.dtype, device=collective_device())
            gathered[bucket.shard].copy_(bucket.segment.twin)
            if bucket.group.size() > 1:
                dist.all_gather_into_tensor(gathered, gathered[bucket.shard], group=bucket.group)
            for span in bucket.params:
                full[span.name] = gathered[span.start : span.end].view_as(span.param).to(self.device, copy=True)
        return full

    @torch.no_grad()
    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the twin from whole per-parameter tensors (as `full_tensors` returns, e.g. from a checkpoint)."""
        missing = [name for name in self._covered if name not in tensors]
        if missing:
            raise KeyError(f"twin weights missing for {len(missing)} parameter(s), e.g. {missing[0]}")
        if not self.sliced:
            for name, segment in self._whole.items():
                segment.twin.copy_(tensors[name].reshape(-1))
            return
        for bucket in self._buckets:
            lo, hi = bucket.shard.start, bucket.shard.stop
            for span in bucket.params:
                start, end = max(lo, span.start), min(hi, span.end)
                if start < end:
                    source = tensors[span.name].reshape(-1)[start - span.start : end - span.start]
                    bucket.segment.twin[start - lo : end - lo].copy_(source)

    # --- bookkeeping --------------------------------------------------------------------
    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's twin storage (its slice when sliced), flat."""
        return [s.twin for s in self._segments]

    @property
    def nbytes(self) -> int:
        """Memory the twin holds on this rank."""
        return sum(s.twin.numel() * s.twin.element_size() for s in self._segments)

    @property
    def numel(self) -> int:
        return sum(s.twin.numel() for s in self._segments)


def _refresh_fp8_caches(model: torch.nn.Module) -> None:
    """Transformer Engine keeps an FP8 copy of each weight between micro-batches and rebuilds it only when
    told the next forward is a first micro-batch; after a swap that copy belongs to the other weights.
    Megatron's `set_is_first_microbatch` sets that flag on every TE module (a no-op without FP8)."""
    inner = unwrap_model(model)
    if hasattr(inner, "set_is_first_microbatch"):
        inner.set_is_first_microbatch()
