"""The one table that knows both the Hugging Face and the Megatron-Core weight layouts.

Each row maps one Megatron parameter to the HF tensor(s) it is made of, with a
transform that knows how the parameter is split across tensor-parallel ranks:

    Replicated   norms: the same full tensor on every TP rank
    RowSplit     linear_proj / linear_fc2: split along the input dim (1)
    VocabSplit   embedding / output layer: rows padded to the padded vocab, split along dim 0
    QKV          q/k/v -> linear_qkv, interleaved per query group [q_1..q_n, k, v],
                 KV heads replicated when the model has fewer than TP
    GatedFC1     gate/up -> linear_fc1 as [gate_r; up_r] on each TP rank r

A transform reads only this rank's slice of each HF tensor (`read_shard`, so a
rank of a large model reads a fraction of the checkpoint) and merges the TP
shards of a parameter back into full HF tensors (`to_hf`, used by the
exporters and the weight sync). `to_checkpoint` / `from_checkpoint` convert
between HF tensors and the whole parameter as Megatron's distributed
checkpoints store it (the offline converters work on that form without
building a model). The offline converters and the rollout weight sync reuse
this table; nothing else may hard-code either layout.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch

from popo_megatron.errors import UserError
from popo_megatron.model.hf_config import HFModelArgs
from popo_megatron.model.layout import kv_replication_factor, megatron_query_groups, padded_vocab_size


class Sliceable(Protocol):
    """An HF tensor that can be read in part: a torch tensor, or a safetensors slice."""

    shape: Sequence[int]

    def __getitem__(self, index) -> torch.Tensor: ...


class MappingError(UserError):
    """HF and Megatron weights do not fit together (wrong model, wrong shapes, missing tensors)."""


@dataclass(frozen=True)
class ShardContext:
    """Everything a transform needs to know about the model and this rank's place in TP."""

    args: HFModelArgs
    tp_rank: int
    tp_size: int
    padded_vocab: int

    @classmethod
    def create(cls, args: HFModelArgs, tp_rank: int, tp_size: int, vocab_divisible_by: int) -> "ShardContext":
        return cls(args, tp_rank, tp_size, padded_vocab_size(args.vocab_size, vocab_divisible_by, tp_size))

    def for_rank(self, tp_rank: int) -> "ShardContext":
        return replace(self, tp_rank=tp_rank)

    def span(self, total: int) -> slice:
        """This rank's contiguous 1/tp share of `total` rows."""
        size = total // self.tp_size
        return slice(self.tp_rank * size, (self.tp_rank + 1) * size)


def _expect(hf: Sliceable, dim: int, size: int, what: str) -> None:
    if tuple(hf.shape)[dim] != size:
        raise MappingError(f"{what}: expected size {size} along dim {dim}, checkpoint has shape {tuple(hf.shape)}")


def check_fits(shape: Sequence[int], out: torch.Tensor) -> None:
    """A MappingError naming both shapes unless a shard of `shape` is what `out` holds."""
    if tuple(shape) != tuple(out.shape):
        raise MappingError(f"checkpoint gives shape {tuple(shape)} but the model expects {tuple(out.shape)}")


def join_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) along dim 0, as a view when the parts already lie end to end in one buffer.

    A parameter alone in a weight-stream bucket arrives as its TP shards in consecutive rows of the
    gathered buffer: joining them is free, where a copy would cost a fresh tensor of its size (on CPU a
    page fault for every 4 KiB of it: the largest tensors, embeddings and output layers, are alone).
    """
    first = parts[0]
    adjacent = all(p.is_contiguous() and p.shape[1:] == first.shape[1:] for p in parts) and all(
        b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and b.data_ptr() == a.data_ptr() + a.nbytes
        for a, b in itertools.pairwise(parts)
    )
    if not adjacent:
        return torch.cat(list(parts))
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


class Transform:
    """Base: the checkpoint form of a parameter is its TP shards joined along `split_axis`."""

    split_axis: int | None = None  # the dim TP splits; None: the same tensor on every TP rank

    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        raise NotImplementedError

    def read_shard_into(self, hf: Sequence[Sliceable], ctx: ShardContext, out: torch.Tensor) -> None:
        """read_shard written into `out` (this rank's parameter, any dtype). Transforms that join pieces
        override it to copy each piece into its place: no joined temporary, one copy from the file."""
        shard = self.read_shard(hf, ctx)
        check_fits(shard.shape, out)
        out.copy_(shard)

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_hf_into(self, shards: Sequence[torch.Tensor], ctx: ShardContext, outs: Sequence[torch.Tensor]) -> None:
        """to_hf written into `outs` (memory of to_hf's shapes, e.g. reused by the weight stream). Transforms
        whose to_hf joins pieces override it to copy each piece into its place: one copy, no temporary."""
        for out, tensor in zip(outs, self.to_hf(shards, ctx), strict=True):
            out.copy_(tensor)

    def to_checkpoint(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        """The whole Megatron parameter (all TP ranks of `ctx.tp_size`) as dist checkpoints store it."""
        if self.split_axis is None:
            return self.read_shard(hf, ctx.for_rank(0))
        return torch.cat([self.read_shard(hf, ctx.for_rank(r)) for r in range(ctx.tp_size)], dim=self.split_axis)

    def from_checkpoint(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        """Inverse of to_checkpoint: the HF tensors of a whole stored parameter."""
        shards = [full] if self.split_axis is None else list(full.chunk(ctx.tp_size, dim=self.split_axis))
        return self.to_hf(shards, ctx)


class Replicated(Transform):
    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return hf[0][:]

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        return [shards[0]]


class RowSplit(Transform):
    """Row-parallel linear: the input dimension (1) is split across TP."""

    split_axis = 1

    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return hf[0][:, ctx.span(hf[0].shape[1])]

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        return [torch.cat(list(shards), dim=1)]

    def to_hf_into(self, shards: Sequence[torch.Tensor], ctx: ShardContext, outs: Sequence[torch.Tensor]) -> None:
        torch.cat(list(shards), dim=1, out=outs[0])

    # The TP slices side by side are the HF tensor itself: no slicing and joining for the whole parameter.
    def to_checkpoint(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return hf[0][:]

    def from_checkpoint(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        return [full]


class VocabSplit(Transform):
    """Vocab-parallel rows, padded with zeros from vocab_size to the padded vocab."""

    split_axis = 0

    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        vocab = ctx.args.vocab_size
        _expect(hf[0], 0, vocab, "vocabulary rows")
        rows = ctx.span(ctx.padded_vocab)
        real = hf[0][rows.start : min(rows.stop, vocab)] if rows.start < vocab else hf[0][0:0]
        pad = rows.stop - rows.start - real.shape[0]
        return torch.cat([real, real.new_zeros((pad, *real.shape[1:]))]) if pad else real

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        return [join_rows(shards)[: ctx.args.vocab_size]]

    def to_hf_into(self, shards: Sequence[torch.Tensor], ctx: ShardContext, outs: Sequence[torch.Tensor]) -> None:
        start = 0
        for shard in shards:  # the padding rows are at the end of the last shards
            rows = min(shard.shape[0], ctx.args.vocab_size - start)
            if rows <= 0:
                break
            outs[0][start : start + rows].copy_(shard[:rows])
            start += rows

    # The whole parameter is every row, padded once: one read instead of one per TP rank.
    def to_checkpoint(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return self.read_shard(hf, replace(ctx, tp_rank=0, tp_size=1))

    def from_checkpoint(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        return [full[: ctx.args.vocab_size]]


class QKV(Transform):
    """q, k, v (weights [heads*head_dim, hidden] or biases [heads*head_dim]) <-> linear_qkv.

    Megatron stores, for each query group g, the rows [q heads of g, k_g, v_g].
    With G' Megatron groups and rep = G' / num_kv_heads, Megatron group g uses
    HF KV head g // rep (rep > 1 only when the model has fewer KV heads than TP).
    The stored form is Megatron's column-parallel one, all groups in order, so it
    depends on TP only through the replication of KV heads.
    """

    split_axis = 0

    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return self._read_groups(hf, ctx, self._local_groups(ctx))

    def read_shard_into(self, hf: Sequence[Sliceable], ctx: ShardContext, out: torch.Tensor) -> None:
        parts = self._group_parts(hf, ctx, self._local_groups(ctx))
        groups, trailing = parts[0].shape[0], parts[0].shape[2:]
        check_fits((groups * sum(p.shape[1] for p in parts), *trailing), out)
        grouped = out.view(groups, -1, *trailing)  # [groups, q + k + v rows, ...]
        start = 0
        for part in parts:
            grouped[:, start : start + part.shape[1]].copy_(part)
            start += part.shape[1]

    def to_checkpoint(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        # Every rank's groups in order: one read of all of them.
        return self._read_groups(hf, ctx, slice(0, megatron_query_groups(ctx.args.num_kv_heads, ctx.tp_size)))

    @staticmethod
    def _local_groups(ctx: ShardContext) -> slice:
        return ctx.span(megatron_query_groups(ctx.args.num_kv_heads, ctx.tp_size))

    def _read_groups(self, hf: Sequence[Sliceable], ctx: ShardContext, local: slice) -> torch.Tensor:
        """Megatron's rows of the query groups `local` (with their KV heads replicated as TP needs)."""
        q_local, k_local, v_local = self._group_parts(hf, ctx, local)
        return torch.cat([q_local, k_local, v_local], dim=1).reshape(-1, *q_local.shape[2:])

    def _group_parts(
        self, hf: Sequence[Sliceable], ctx: ShardContext, local: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v rows of the query groups `local`, each [groups, rows, ...]: views of the checkpoint
        unless KV heads are replicated."""
        a = ctx.args
        q, k, v = hf
        d = a.head_dim
        _expect(q, 0, a.num_attention_heads * d, "q_proj rows")
        _expect(k, 0, a.num_kv_heads * d, "k_proj rows")
        _expect(v, 0, a.num_kv_heads * d, "v_proj rows")
        groups = megatron_query_groups(a.num_kv_heads, ctx.tp_size)
        rep = kv_replication_factor(a.num_kv_heads, ctx.tp_size)
        heads_per_group = a.num_attention_heads // groups
        q_local = q[slice(local.start * heads_per_group * d, local.stop * heads_per_group * d)]
        trailing = q_local.shape[1:]
        q_local = q_local.reshape(local.stop - local.start, heads_per_group * d, *trailing)
        kv_first, kv_last = local.start // rep, (local.stop - 1) // rep
        kv_rows = slice(kv_first * d, (kv_last + 1) * d)
        k_local = k[kv_rows].reshape(-1, d, *trailing)
        v_local = v[kv_rows].reshape(-1, d, *trailing)
        if rep > 1:  # each KV head serves `rep` consecutive groups
            kv_index = torch.tensor([g // rep - kv_first for g in range(local.start, local.stop)])
            k_local, v_local = k_local[kv_index], v_local[kv_index]
        return q_local, k_local, v_local

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        return self._split(join_rows(shards), ctx)

    def to_hf_into(self, shards: Sequence[torch.Tensor], ctx: ShardContext, outs: Sequence[torch.Tensor]) -> None:
        rep = kv_replication_factor(ctx.args.num_kv_heads, ctx.tp_size)
        groups = megatron_query_groups(ctx.args.num_kv_heads, ctx.tp_size) // len(shards)  # per shard
        trailing = shards[0].shape[1:]
        q_out, k_out, v_out = (
            out.view(-1, rows, *trailing) for out, rows in zip(outs, self._group_rows(ctx), strict=True)
        )
        for r, shard in enumerate(shards):
            q, k, v = self._groups(shard, ctx)
            first = r * groups
            q_out[first : first + groups].copy_(q)
            # Replicated KV heads are identical copies; keep the first of each: groups first, first + rep, ...
            keep = (-first) % rep
            k, v = k[keep::rep], v[keep::rep]
            head = (first + keep) // rep
            k_out[head : head + k.shape[0]].copy_(k)
            v_out[head : head + v.shape[0]].copy_(v)

    def from_checkpoint(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        return self._split(full, ctx)  # the stored form is the TP shards joined: no need to cut and rejoin

    @staticmethod
    def _group_rows(ctx: ShardContext) -> tuple[int, int, int]:
        """Rows of q, k and v in each Megatron query group."""
        d = ctx.args.head_dim
        return ctx.args.num_attention_heads // megatron_query_groups(ctx.args.num_kv_heads, ctx.tp_size) * d, d, d

    def _groups(self, rows: torch.Tensor, ctx: ShardContext) -> tuple[torch.Tensor, ...]:
        """q, k and v of Megatron's rows of whole query groups, each [groups, rows, ...] (views)."""
        sizes = self._group_rows(ctx)
        return rows.reshape(-1, sum(sizes), *rows.shape[1:]).split(sizes, dim=1)

    def _split(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        """q, k and v of Megatron's rows of every query group."""
        rep = kv_replication_factor(ctx.args.num_kv_heads, ctx.tp_size)
        q, k, v = self._groups(full, ctx)
        trailing = full.shape[1:]
        # Replicated KV heads are identical copies; keep the first of each.
        return [q.reshape(-1, *trailing), k[::rep].reshape(-1, *trailing), v[::rep].reshape(-1, *trailing)]


class GatedFC1(Transform):
    """gate_proj, up_proj <-> linear_fc1, concatenated [gate_r; up_r] within each TP shard.

    Megatron's checkpoints store the whole parameter as [gate; up] (its swiglu
    sharded factory), which does not depend on TP.
    """

    def read_shard(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return torch.cat(self._local_rows(hf, ctx))

    def read_shard_into(self, hf: Sequence[Sliceable], ctx: ShardContext, out: torch.Tensor) -> None:
        gate, up = self._local_rows(hf, ctx)
        check_fits((gate.shape[0] + up.shape[0], *gate.shape[1:]), out)
        out[: gate.shape[0]].copy_(gate)
        out[gate.shape[0] :].copy_(up)

    @staticmethod
    def _local_rows(hf: Sequence[Sliceable], ctx: ShardContext) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = hf
        _expect(gate, 0, ctx.args.intermediate_size, "gate_proj rows")
        _expect(up, 0, ctx.args.intermediate_size, "up_proj rows")
        rows = ctx.span(ctx.args.intermediate_size)
        return gate[rows], up[rows]

    def to_hf(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        return [torch.cat(pieces) for pieces in self._hf_pieces(shards)]

    def to_hf_into(self, shards: Sequence[torch.Tensor], ctx: ShardContext, outs: Sequence[torch.Tensor]) -> None:
        for pieces, out in zip(self._hf_pieces(shards), outs, strict=True):
            torch.cat(pieces, out=out)

    @staticmethod
    def _hf_pieces(shards: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gate rows of every shard, and the up rows, in TP order."""
        halves = [s.chunk(2) for s in shards]
        return [h[0] for h in halves], [h[1] for h in halves]

    def to_checkpoint(self, hf: Sequence[Sliceable], ctx: ShardContext) -> torch.Tensor:
        return self.read_shard(hf, ShardContext(ctx.args, 0, 1, ctx.padded_vocab))

    def from_checkpoint(self, full: torch.Tensor, ctx: ShardContext) -> list[torch.Tensor]:
        return list(full.chunk(2))


@dataclass(frozen=True)
class Row:
    megatron: str  # "{layer}" stands for the layer index
    hf: tuple[str, ...]
    transform: Transform
    # Which models have this row: "always", "tied", "untied", "qkv_bias", "qk_norm".
    when: str = "always"


_M = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

# Dense decoder-only models: Qwen2 / Qwen2.5 / Qwen3 / Llama (local layer spec names).
DENSE_DECODER: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabSplit()),
    Row(_M + "input_layernorm.weight", (_H + "input_layernorm.weight",), Replicated()),
    Row(
        _M + "self_attention.linear_qkv.weight",
        tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        QKV(),
    ),
    Row(
        _M + "self_attention.linear_qkv.bias",
        tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
        QKV(),
        when="qkv_bias",
    ),
    Row(_M + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), Replicated(), when="qk_norm"),
    Row(_M + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), Replicated(), when="qk_norm"),
    Row(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), RowSplit()),
    Row(_M + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), Replicated()),
    Row(_M + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GatedFC1()),
    Row(_M + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), RowSplit()),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",), Replicated()),
    Row("output_layer.weight", ("lm_head.weight",), VocabSplit(), when="untied"),
    # Tied models ship no lm_head; the last pipeline stage's copy of the output
    # layer (present only with PP > 1) is read from the embedding.
    Row("output_layer.weight", ("model.embed_tokens.weight",), VocabSplit(), when="tied"),
)

MAPPING_TABLES: dict[str, tuple[Row, ...]] = {"qwen2": DENSE_DECODER, "qwen3": DENSE_DECODER, "llama": DENSE_DECODER}

# With Transformer Engine's fused layernorm-linear modules the pre-norm weights
# live inside the following linear. Megatron's checkpoints use these names for
# both layer specs, so checkpoints do not depend on the spec.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te_name(name: str) -> str:
    for local, fused in _TE_NAMES.items():
        name = name.replace(local, fused)
    return name


def _applies(row: Row, args: HFModelArgs) -> bool:
    return {
        "always": True,
        "tied": args.tie_word_embeddings,
        "untied": not args.tie_word_embeddings,
        "qkv_bias": args.qkv_bias,
        "qk_norm": args.qk_norm,
    }[row.when]


@dataclass(frozen=True)
class ResolvedMapping:
    """One Megatron parameter (global layer numbering) and its HF sources."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    # The tied output layer: a copy of the embedding that the last pipeline stage
    # keeps. Exporters and the weight sync skip it (HF has one tensor).
    duplicate: bool = False


@dataclass(frozen=True)
class CheckpointParam:
    """One parameter as a Megatron distributed checkpoint stores it.

    Transformer-layer parameters of all layers share one key and are stacked
    along a leading axis; `layer` is the index on that axis (None otherwise).
    """

    key: str
    layer: int | None
    mapping: ResolvedMapping


class WeightMap:
    """The rows of a model's table that apply to it, addressable by Megatron name."""

    def __init__(self, args: HFModelArgs, layer_spec: str = "local") -> None:
        self.args = args
        self._rows: list[tuple[re.Pattern[str], str, Row]] = []
        for row in MAPPING_TABLES[args.family]:
            if not _applies(row, args):
                continue
            name = _te_name(row.megatron) if layer_spec == "te" else row.megatron
            pattern = re.escape(name).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
            self._rows.append((re.compile(pattern + "$"), name, row))

    def resolve(self, megatron_name: str, layer_offset: int = 0) -> ResolvedMapping:
        """Map a Megatron parameter name (local layer index + `layer_offset` = global
        index, as under pipeline parallelism) to its HF tensors."""
        for pattern, template, row in self._rows:
            match = pattern.match(megatron_name)
            if match is None:
                continue
            layer = int(match["layer"]) + layer_offset if "layer" in match.groupdict() else None
            return _resolve(row, template, layer)
        raise MappingError(f"no HF mapping for Megatron parameter {megatron_name!r} ({self.args.architecture})")

    def checkpoint_params(self) -> list[CheckpointParam]:
        """Every parameter of the whole model (all layers, all stages) under its checkpoint
        key, without the tied output layer's copy (checkpoints store it as the embedding)."""
        params = []
        for _, template, row in self._rows:
            if row.when == "tied":
                continue
            key = _te_name(row.megatron).replace("layers.{layer}.", "layers.")
            layers = range(self.args.num_layers) if "{layer}" in row.megatron else [None]
            params += [CheckpointParam(key, layer, _resolve(row, template, layer)) for layer in layers]
        return params


def _resolve(row: Row, template: str, layer: int | None) -> ResolvedMapping:
    return ResolvedMapping(
        template.format(layer=layer), tuple(h.format(layer=layer) for h in row.hf), row.transform, row.when == "tied"
    )
