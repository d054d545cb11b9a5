"""The training batch of one data-parallel rank: prompt + response token rows, right-padded, or the same
sequences packed end to end (algo/packing.py).

Position t of a row predicts token t + 1, so every per-token tensor is indexed
by the position that *predicts* the token: `loss_mask[b, t]` is true when
`tokens[b, t + 1]` is a response token, and `old_logprobs[b, t]` is the
log-probability of that token. The last position of a sequence predicts nothing
(it is never in the mask), so sequences laid end to end keep their masks.

A batch holds per-token tensors [P, T] and per-sequence ones [N]. Padded (`layout` None) each row is one
sequence, P = N; packed, a pack holds several sequences and `layout` says where each lies. Code that goes
between the two uses `per_token` (a sequence's value at each of its positions) and `per_sequence_sum`
(a sum over each sequence's positions), and so is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from popo_megatron.algo.packing import pack_bounds, positions_in_sequence, sequence_index

PER_SEQUENCE = ("sample_weights", "positive", "rows")


@dataclass(frozen=True)
class PackLayout:
    """Where each of the N sequences of a packed batch lies."""

    index: torch.Tensor  # [P, T] int64: the sequence of each position (-1: the padding after a pack's last)
    origin: torch.Tensor  # [N] int64: its row in the padded batch it was packed from
    start: torch.Tensor  # [N] int64: its first position in its pack
    length: torch.Tensor  # [N] int64: prompt + response tokens (rounded up to `multiple`)
    multiple: int = 1  # what each length is a multiple of (2 x CP under context parallelism)

    def to(self, device: torch.device) -> "PackLayout":
        tensors = ("index", "origin", "start", "length")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})


@dataclass
class PolicyBatch:
    tokens: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] bool: the token predicted at t is a response token
    sample_weights: torch.Tensor  # [B] float32: POPO's w_i or GRPO's advantage
    positive: torch.Tensor  # [B] bool: reward above the threshold
    rows: torch.Tensor | None = None  # [B] int64: each row's index in the step's batch (-1: padding)
    old_logprobs: torch.Tensor | None = None  # [B, S] pi_old (trainer forward or rollout engine)
    rollout_logprobs: torch.Tensor | None = None  # [B, S] the engine's sampled-token log-probs
    ref_logprobs: torch.Tensor | None = None  # [B, S] GRPO's frozen reference (KL)
    layout: PackLayout | None = None  # packed: where each sequence lies (None: padded, a row per sequence)

    @property
    def targets(self) -> torch.Tensor:
        """[B, S]: the token each position predicts (0 at the last position, which is never in the mask)."""
        return torch.nn.functional.pad(self.tokens[:, 1:], (0, 1))

    @property
    def size(self) -> int:
        """The number of sequences."""
        return self.sample_weights.shape[0]

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence `values` [N] at each position of their sequence, broadcastable against [P, T] (0 or
        False at a pack's padding)."""
        if self.layout is None:
            return values.unsqueeze(-1)
        index = self.layout.index.to(values.device)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        if self.size == 0:  # an empty pack (a rank with less to train than another): padding only
            return zero.expand(index.shape)
        return torch.where(index >= 0, values[index.clamp(min=0)], zero)

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[N]: the sum of per-token `values` [P, T] over each sequence's positions (bool counts as int)."""
        if values.dtype == torch.bool:
            values = values.long()
        if self.layout is None:
            return values.sum(-1)
        index = self.layout.index.to(values.device)
        valid = index >= 0
        out = torch.zeros(self.size, *values.shape[2:], dtype=values.dtype, device=values.device)
        return out.index_add_(0, index[valid], values[valid])

    def response_lengths(self) -> torch.Tensor:
        return self.per_sequence_sum(self.loss_mask)

    def positions(self) -> torch.Tensor:
        """[P, T] int64: each position's offset in its own sequence (what the model's position ids are)."""
        if self.layout is None:
            return torch.arange(self.tokens.shape[1], device=self.tokens.device).expand_as(self.tokens)
        return positions_in_sequence(self.layout.index.to(self.tokens.device))

    def row_lengths(self, multiple: int = 1) -> torch.Tensor:
        """[B] int64 of a padded batch: each row's prompt + response tokens as far as a loss needs them (up
        to the token after its last mask position; 0 for a row with an empty mask, which no pass needs),
        rounded up to `multiple` (context parallelism splits each sequence into 2 x CP equal chunks)."""
        self._padded_only("row_lengths")
        positions = torch.arange(self.loss_mask.shape[1], device=self.loss_mask.device)
        last = torch.where(self.loss_mask, positions, -2).max(-1).values
        return (last + 2 + multiple - 1) // multiple * multiple

    def packed(self, packs: Sequence[Sequence[int]], width: int, multiple: int = 1) -> "PolicyBatch":
        """The rows `packs` lists (of this padded batch) laid end to end, each list one pack of `width`
        positions; the per-sequence fields follow their rows. A row enters with `row_lengths(multiple)`
        tokens (past its end: padding, in no loss)."""
        self._padded_only("packed")
        lengths = self.row_lengths(multiple)
        origin = torch.tensor([row for pack in packs for row in pack], dtype=torch.long)
        length = lengths[origin]
        local = [sequence_index(lengths[list(pack)].tolist(), width) for pack in packs]
        firsts = torch.tensor([0] + [len(pack) for pack in packs]).cumsum(0)[:-1]
        # The sequences numbered across the packs, in order: a position's sequence and its column in its row.
        index = torch.stack([torch.where(ids >= 0, ids + first, -1) for ids, first in zip(local, firsts, strict=True)])
        valid = index >= 0
        sequence, column = index[valid], positions_in_sequence(index)[valid]
        first_positions = column == 0
        start = torch.zeros(len(origin), dtype=torch.long)  # a sequence of no tokens has none: 0
        start[sequence[first_positions]] = torch.arange(width).expand_as(index)[valid][first_positions]
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layout" or value is None:
                continue
            if f.name in PER_SEQUENCE:
                out[f.name] = value[origin]
                continue
            laid = torch.zeros((len(packs), width), dtype=value.dtype)
            # A length rounded up to `multiple` may run past the padded row: padding (0, False) there.
            inside = column < value.shape[1]
            source = value[origin[sequence], column.clamp(max=value.shape[1] - 1)]
            laid[valid] = torch.where(inside, source, torch.zeros((), dtype=value.dtype))
            out[f.name] = laid
        return PolicyBatch(**out, layout=PackLayout(index, origin, start, length, multiple))

    def pack_bounds(self) -> list[int]:
        """The sequence boundaries of a micro-batch of one pack (algo/packing.pack_bounds), its padding in
        pieces of the layout's `multiple`."""
        if self.layout is None or self.tokens.shape[0] != 1:
            raise ValueError("pack_bounds is defined on a micro-batch of one pack")
        return pack_bounds(self.layout.length.tolist(), self.tokens.shape[1], self.layout.multiple)

    def unpacked(self, values: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        """Per-token `values` [P, T] of this packed batch in the padded form it was packed from: [rows,
        width], 0 at the rows and positions no sequence brought."""
        layout = self.layout
        out = torch.zeros((rows, width), dtype=values.dtype, device=values.device)
        index = layout.index.to(values.device)
        valid = index >= 0
        sequence = index[valid]
        columns = torch.arange(index.shape[1], device=values.device).expand_as(index)[valid]
        columns = columns - layout.start.to(values.device)[sequence]
        inside = columns < width  # a sequence's padding up to a length multiple has no padded column
        out[layout.origin.to(values.device)[sequence[inside]], columns[inside]] = values[valid][inside]
        return out

    def _padded_only(self, what: str) -> None:
        if self.layout is not None:
            raise ValueError(f"{what} is defined on a padded batch; this one is packed")

    def response_positions(self) -> torch.Tensor:
        """[B, S] bool: the positions that hold a response token (the loss mask shifted by one: position t
        predicts token t + 1). The paper pools the final hidden states over these."""
        return torch.nn.functional.pad(self.loss_mask[:, :-1], (1, 0))

    def padded_micro_batches(self, size: int) -> list["PolicyBatch"]:
        """Micro-batches of `size` rows (one of all rows when there are fewer), the last one filled up with
        empty rows (no loss token, row index -1): Megatron's schedules need equal micro-batch shapes."""
        if self.size <= size:
            return [self]
        count = -(-self.size // size)
        extra = count * size - self.size
        if extra:
            filler = self[torch.zeros(extra, dtype=torch.long)].emptied()
            padded = PolicyBatch(
                **{
                    f.name: None
                    if getattr(self, f.name) is None
                    else torch.cat([getattr(self, f.name), getattr(filler, f.name)])
                    for f in fields(self)
                }
            )
            return padded.micro_batches(count)
        return self.micro_batches(count)

    def emptied(self) -> "PolicyBatch":
        """The same shapes, no loss token, weight 0, not positive, row index -1: padding rows."""
        empty = torch.ones(self.size, dtype=torch.bool)
        rows = None if self.rows is None else torch.full_like(self.rows, -1)
        return replace(
            self.without_rows(empty),
            sample_weights=torch.zeros_like(self.sample_weights),
            positive=torch.zeros_like(self.positive),
            rows=rows,
        )

    def micro_batches(self, count: int) -> list["PolicyBatch"]:
        """`count` equal consecutive slices along the batch dimension."""
        if count < 1 or self.size % count:
            raise ValueError(f"a batch of {self.size} rows does not split into {count} equal micro-batches")
        step = self.size // count
        return [self[i * step : (i + 1) * step] for i in range(count)]

    def __getitem__(self, rows: slice | torch.Tensor) -> "PolicyBatch":
        self._padded_only("selecting rows")
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        return PolicyBatch(**{k: None if v is None else v[rows] for k, v in tensors.items()})

    def to(self, device: torch.device) -> "PolicyBatch":
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        moved = {k: None if v is None else v.to(device, non_blocking=True) for k, v in tensors.items()}
        return PolicyBatch(**moved, layout=None if self.layout is None else self.layout.to(device))

    def with_fields(self, **changes: torch.Tensor) -> "PolicyBatch":
        return replace(self, **changes)

    def trimmed(self, multiple: int = 1) -> "PolicyBatch":
        """Without the trailing positions no loss token needs (the longest row's last response token
        is predicted at its last mask position; the token after it closes the row), length rounded up
        to `multiple`."""
        self._padded_only("trimmed")
        used = self.loss_mask.any(0).nonzero()
        length = int(used[-1]) + 2 if len(used) else 1
        length = min(self.tokens.shape[1], -(-length // multiple) * multiple)
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        return PolicyBatch(**{k: v if v is None or v.dim() == 1 else v[:, :length] for k, v in tensors.items()})

    def without_rows(self, drop: torch.Tensor) -> "PolicyBatch":
        """The batch with the `drop` [N] sequences' loss masks cleared: they stay (shapes are unchanged) but carry
        no token into any loss or normaliser (e.g. `loss.mask_truncated`: responses cut at the length limit)."""
        return replace(self, loss_mask=self.loss_mask & ~self.per_token(drop))


def pack_rows(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int = 0,
    length_multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, S] tokens of prompt + response rows and the loss mask of the response tokens.

    S is the longest row rounded up to `length_multiple` (TP with sequence
    parallelism needs S divisible by TP). An empty response gives a row with an
    empty mask.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"row {i}: empty prompt (a response needs at least one token before it)")
    longest = max(lengths, default=1)
    seq = -(-longest // length_multiple) * length_multiple
    tokens = torch.full((len(prompts), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), seq), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        row = list(prompt) + list(response)
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        # Position t predicts token t + 1: response tokens at [len(prompt), len(row)) are predicted from t - 1.
        mask[i, len(prompt) - 1 : len(row) - 1] = True
    return tokens, mask


def spread_per_token(mask: torch.Tensor, per_response: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-response-token values (e.g. an engine's log-probs) placed at the mask's positions of a [B, S] float32."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, row in enumerate(per_response):
        positions = mask[i].nonzero().squeeze(-1)
        if len(positions) != len(row):
            raise ValueError(f"row {i}: {len(row)} values for {len(positions)} response tokens")
        out[i, positions] = torch.tensor(list(row), dtype=torch.float32)
    return out


def make_policy_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    values: torch.Tensor,
    positive: torch.Tensor,
    truncated: torch.Tensor | None = None,
    rollout_logprobs: Sequence[Sequence[float]] | None = None,
    pad_id: int = 0,
    length_multiple: int = 1,
    mask_truncated: bool = False,
) -> PolicyBatch:
    """The training batch of G rollouts per prompt, in group order (rows g*G .. g*G+G-1 share a prompt).

    values / positive / truncated: [groups, G]: each rollout's weight or advantage (the objective's), whether
    it is positive, whether it was cut at the length limit. With `mask_truncated` the cut rollouts carry no
    token into the loss. Rows are padded to a multiple of `length_multiple` (TP with sequence parallelism).
    """
    if values.dim() != 2 or values.numel() != len(responses):
        raise ValueError(f"values {tuple(values.shape)} must be [groups, G] with one per response ({len(responses)})")
    tokens, mask = pack_rows(prompts, responses, pad_id, length_multiple)
    batch = PolicyBatch(tokens, mask, values.reshape(-1).float(), positive.reshape(-1), torch.arange(len(responses)))
    if rollout_logprobs is not None:
        batch.rollout_logprobs = spread_per_token(mask, rollout_logprobs)
    if mask_truncated and truncated is not None:
        batch = batch.without_rows(truncated.reshape(-1).bool())
    return batch
