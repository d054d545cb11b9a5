"""Sequence packing: the packing and balancing algorithms against brute-force optima, the pack's index
tensors against loops, and a real megatron-core model whose packed forward and backward (THD through the
local spec's attention, model/packed_attention.py) equal the padded ones per sequence."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from popo_megatron.algo.packing import (
    balance_by_tokens,
    pack_bounds,
    pack_by_tokens,
    positions_in_sequence,
    sequence_index,
    split_into,
    thd_params,
)
from popo_megatron.launch import run_local


def _fewest_packs(lengths: list[int], budget: int) -> int:
    """The optimum by brute force: the fewest packs any assignment needs."""
    for count in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(count), repeat=len(lengths)):
            sums = [0] * count
            for length, pack in zip(lengths, assignment, strict=True):
                sums[pack] += length
            if max(sums) <= budget:
                return count
    return len(lengths)


def _best_balance(lengths: list[int], parts: int) -> int:
    """The optimum by brute force: the smallest largest group sum over all assignments."""
    best = sum(lengths)
    for assignment in itertools.product(range(parts), repeat=len(lengths)):
        sums = [0] * parts
        for length, part in zip(lengths, assignment, strict=True):
            sums[part] += length
        best = min(best, max(sums))
    return best


def test_packs_hold_every_sequence_once_within_the_budget_and_near_the_fewest():
    rng = random.Random(0)
    for _ in range(40):
        budget = rng.randint(8, 20)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 7))]
        packs = pack_by_tokens(lengths, budget)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in p) <= budget for p in packs)
        # First-fit decreasing's bound: at most 11/9 of the optimum plus 6/9.
        assert len(packs) <= 11 / 9 * _fewest_packs(lengths, budget) + 6 / 9, (lengths, budget, packs)


def test_a_sequence_at_the_budget_fits_and_one_over_it_is_refused_by_index():
    assert pack_by_tokens([5, 8, 3], 8) == [[1], [0, 2]]
    assert pack_by_tokens([1], 1) == [[0]]
    with pytest.raises(ValueError, match=r"sequence 2 has 9 tokens, more than the micro-batch budget of 8"):
        pack_by_tokens([5, 8, 9], 8)


def test_balanced_groups_are_near_the_best_split():
    rng = random.Random(1)
    for _ in range(30):
        parts = rng.randint(2, 3)
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(parts, 8))]
        groups = balance_by_tokens(lengths, parts)
        assert len(groups) == parts and sorted(i for g in groups for i in g) == list(range(len(lengths)))
        largest = max(sum(lengths[i] for i in g) for g in groups)
        # The largest differencing method's worst case is LPT's: 4/3 - 1/(3k) of the optimum.
        assert largest <= (4 / 3 - 1 / (3 * parts)) * _best_balance(lengths, parts), (lengths, groups)
    assert balance_by_tokens([], 2) == [[], []]
    assert balance_by_tokens([4, 4, 4, 4], 2) in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]])


def test_packs_split_to_a_count_by_halving_the_widest_then_adding_empty_ones():
    lengths = [6, 5, 4, 1]
    packs = pack_by_tokens(lengths, 16)  # one pack of 16
    assert packs == [[0, 1, 2, 3]]
    three = split_into(packs, lengths, 3)
    assert sorted(i for p in three for i in p) == [0, 1, 2, 3]
    # Halved into 5 + 4 and 6 + 1 (the best halves), then the wider half into 5 and 4.
    assert sorted(sum(lengths[i] for i in p) for p in three) == [4, 5, 7]
    assert split_into([[0], [1]], [3, 3], 4) == [[0], [1], [], []]
    with pytest.raises(ValueError):
        split_into([[0], [1]], [3, 3], 1)


def test_a_packs_index_tensors_match_loops():
    index = torch.stack([sequence_index([3, 1, 2], 8), sequence_index([5], 8)])
    assert index.tolist() == [[0, 0, 0, 1, 2, 2, -1, -1], [0, 0, 0, 0, 0, -1, -1, -1]]
    assert positions_in_sequence(index).tolist() == [[0, 1, 2, 0, 0, 1, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    with pytest.raises(ValueError, match="do not fit"):
        sequence_index([5, 4], 8)


def test_thd_boundaries_cover_the_pack():
    # The padding after the last sequence: sequences of one token (of 2 x CP tokens under CP).
    assert pack_bounds([3, 1, 2], 8) == [0, 3, 4, 6, 7, 8]
    assert pack_bounds([4, 4], 8) == [0, 4, 8] and pack_bounds([], 3) == [0, 1, 2, 3]
    assert pack_bounds([4], 12, piece=4) == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="do not fit"):
        pack_bounds([5, 4], 8)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        pack_bounds([4], 10, piece=4)
    params = thd_params(pack_bounds([3, 1, 2], 7))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 3, 4, 6, 7]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 3
    assert thd_params([0, 4, 8]).cu_seqlens_kv.tolist() == [0, 4, 8]


def _packed_equals_padded_worker(model_dirs: dict[str, str]) -> None:
    from model_helpers import build_model

    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import forward_micro_batch
    from popo_megatron.weights import load_hf_weights

    vocab = 1000
    lengths = [9, 3, 14, 6, 2, 11, 3, 3]  # packs of 16: 14 + 2, 11 + 3, 9 + 6, 3 + 3 (one batch of two)
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    # Each sequence as a row of one prompt token and its response: the loss mask covers every next token.
    batch = make_policy_batch(
        [s[:1].tolist() for s in sequences],
        [s[1:].tolist() for s in sequences],
        torch.ones(len(lengths), 1),
        torch.ones(len(lengths), 1) > 0,
    )
    for name, path in model_dirs.items():
        model, args, cfg = build_model(Path(path), 1, 1)
        load_hf_weights(model, path, args, cfg)

        def loss_of(logits, mb):
            return -torch.where(
                mb.loss_mask,
                torch.log_softmax(logits[..., :vocab].float(), -1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1),
                0.0,
            ).sum()

        model.zero_grad()
        logits = forward_micro_batch(model, batch)
        loss_of(logits, batch).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}

        packs = pack_by_tokens(lengths, 16)
        assert len(packs) < len(lengths), "some sequences share a pack"
        model.zero_grad()
        for pack in packs:
            mb = batch.packed([pack], 16)
            packed_logits = forward_micro_batch(model, mb)
            back = mb.unpacked(packed_logits[..., 0], batch.size, batch.tokens.shape[1])
            for j, row in enumerate(pack):
                n = lengths[row]
                start = int(mb.layout.start[j])
                diff = (packed_logits[0, start : start + n] - logits[row, :n]).abs().max().item()
                assert diff < 1e-4, f"{name}: sequence {row}'s logits differ by {diff}"
                assert torch.equal(back[row, :n], packed_logits[0, start : start + n, 0])
            loss_of(packed_logits, mb).backward()
        for key, param in model.named_parameters():
            diff = (param.grad - grads[key]).abs().max().item()
            assert diff < 1e-4 * max(1.0, grads[key].abs().max().item()), f"{name}: {key} grad differs by {diff}"


def test_a_packed_forward_and_backward_equal_the_padded_ones_per_sequence(tiny_models):
    """Qwen2 (RoPE theta 1e6), Llama 3.1 (scaled RoPE) and Qwen3 (q/k norms): a sequence placed after others
    in a pack gives its logits and gradients as alone."""
    run_local(_packed_equals_padded_worker, 1, {k: str(tiny_models[k]) for k in ("qwen2_tied", "llama", "qwen3")})


def _random_batch(rows: int, seed: int):
    from popo_megatron.algo.batch import make_policy_batch

    rng = random.Random(seed)
    prompts = [[rng.randint(1, 99) for _ in range(rng.randint(1, 6))] for _ in range(rows)]
    responses = [[rng.randint(1, 99) for _ in range(rng.randint(0, 7))] for _ in range(rows)]
    values = torch.tensor([rng.uniform(-1, 1) for _ in range(rows)]).view(-1, 2)
    logprobs = [[-rng.random() for _ in r] for r in responses]
    positive = values > 0
    return make_policy_batch(prompts, responses, values, positive, rollout_logprobs=logprobs)


def test_a_packed_batch_holds_each_rows_tokens_and_values_where_its_layout_says():
    batch = _random_batch(10, seed=3)
    lengths = batch.row_lengths()
    assert lengths.tolist() == [
        0 if not n else int(batch.loss_mask[i].nonzero().max()) + 2 for i, n in enumerate(batch.response_lengths())
    ]
    used = [i for i in range(batch.size) if lengths[i] > 0]
    plan = pack_by_tokens([int(lengths[i]) for i in used], 16)
    packs = [[used[j] for j in pack] for pack in plan]
    packed = batch.packed(packs, 16)
    origin = packed.layout.origin
    assert packed.size == len(used) and sorted(origin.tolist()) == used
    assert torch.equal(packed.response_lengths(), batch.response_lengths()[origin])
    assert torch.equal(packed.sample_weights, batch.sample_weights[origin])
    weighted = packed.per_sequence_sum(torch.where(packed.loss_mask, packed.per_token(packed.sample_weights), 0.0))
    assert torch.allclose(weighted, batch.sample_weights[origin] * batch.response_lengths()[origin])
    width = batch.tokens.shape[1]
    keep = torch.zeros(batch.size, dtype=torch.bool)
    keep[used] = True
    for name in ("loss_mask", "rollout_logprobs"):
        back = packed.unpacked(getattr(packed, name), batch.size, width)
        assert torch.equal(back[keep], torch.where(batch.loss_mask, getattr(batch, name), 0)[keep]), name
    assert torch.equal(
        packed.unpacked(packed.response_positions(), batch.size, width)[keep], batch.response_positions()[keep]
    )
    # Each masked position predicts its own sequence's next token, in the pack as in the row.
    targets = packed.unpacked(torch.where(packed.loss_mask, packed.targets, 0), batch.size, width)
    assert torch.equal(targets[keep], torch.where(batch.loss_mask, batch.targets, 0)[keep])
    assert packed.positions().max() < lengths.max()
    with pytest.raises(ValueError, match="packed"):
        packed[0:1]


def test_an_empty_pack_is_padding_only():
    """A rank with less to train than another fills its count with empty packs: no sequence, no token."""
    empty = _random_batch(4, seed=5).packed([[]], 8)
    assert empty.size == 0 and not empty.loss_mask.any()
    assert empty.per_token(empty.sample_weights).tolist() == [[0.0] * 8]
    assert empty.per_sequence_sum(empty.loss_mask).tolist() == []


def test_the_pass_plan_counts_micro_batches_padding_and_activations(tmp_path):
    import json

    from tiny_models import QWEN2_CONFIG_JSON

    from popo_megatron.layout_plan import (
        activation_bytes_per_token,
        long_tailed_lengths,
        peak_activation_bytes,
        plan_packed,
        plan_padded,
    )
    from popo_megatron.model.hf_config import read_hf_config

    lengths = [10, 3, 7, 2]
    padded = plan_padded(lengths, 2)  # two micro-batches of 2 rows x 10
    assert (padded.micro_batches, padded.computed_tokens, padded.real_tokens) == (2, 40, 22)
    assert padded.padding_share == pytest.approx(18 / 40)
    # Packs 10 + 2 and 7 + 3: 22 positions, or 2 x 12 padded to the budget for the pipeline's fixed shapes.
    assert plan_packed(lengths, 12, pipeline=False).computed_tokens == 22
    assert plan_packed(lengths, 12, pipeline=True).computed_tokens == 24
    # CP=2 rounds each sequence up to a multiple of 4 (12, 4, 8, 4): packs 12, 8 + 4 and 4: 28 positions.
    split = plan_packed(lengths, 12, pipeline=False, multiple=4)
    assert (split.micro_batches, split.computed_tokens, split.real_tokens) == (3, 28, 22)
    responses = long_tailed_lengths(1000, 4096, 512, 0.1, seed=1)
    assert sum(n == 4096 for n in responses) >= 100 and 380 < sorted(responses)[500] < 700

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG_JSON))
    args = read_hf_config(tmp_path)  # h 64, f 96, 4 heads of 16, 2 KV heads, 4 layers, vocab 1000
    h, f, kv_width = 64, 96, 2 * 16
    fused = activation_bytes_per_token(args, 1, False, True, 100)
    assert fused == 2 * (h + 2 * kv_width) + 2 * h + 8 * f + 8 * h
    # Sequence parallelism splits the norm and linear inputs too; the local attention adds its probabilities.
    assert activation_bytes_per_token(args, 2, True, True, 100) == fused / 2
    assert activation_bytes_per_token(args, 1, False, False, 100) == fused + 2 * 4 * 100
    one = peak_activation_bytes(args, 1000, 1000, 1, 2, False, True, micro_batches=8)
    assert one["micro_batch"] == fused * 1000 * 2  # two of the four layers on a stage
    assert one["first_stage"] == 2 * one["micro_batch"]  # 1F1B: PP micro-batches in flight
    assert one["last_stage"] > one["micro_batch"]  # and the logits


def test_popo_layout_plans_a_long_tailed_step(tmp_path):
    import json
    import subprocess
    import sys

    from tiny_models import QWEN2_CONFIG_JSON

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG_JSON))
    command = [sys.executable, "-m", "popo_megatron", "layout", "examples/tiny_cpu.yaml", f"model.hf_path={tmp_path}"]
    proc = subprocess.run(
        [*command, "--world", "1", "--response-median", "64", "--budget", "512"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "padded (" in proc.stdout and "packed (512 tokens)" in proc.stdout, proc.stdout
    split = subprocess.run(
        [
            *command,
            "parallel.context_parallel_size=2",
            "train.max_tokens_per_microbatch=512",
            "--world",
            "2",
            "--response-median",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert split.returncode == 0, split.stderr[-2000:]
    assert "TP 1 x PP 1 x CP 2 x DP 1" in split.stdout and "split over 2 context-parallel ranks" in split.stdout
    assert "padded (" not in split.stdout and "packed (512 tokens)" in split.stdout, "CP runs packs only"
