"""Benchmark: the trainer's forward and backward over long-tailed rollouts, packed against padded.

One batch of rollouts whose response lengths are long-tailed as reasoning traces are (lognormal with a
median of 1/8 of the length limit, 10% cut at the limit) goes through `algo/step.py`'s forward-backward
on a small random Qwen2, in one process, twice: in padded micro-batches of `--rows` rows (each padded to
the step's longest row, as the trainer does), and packed into micro-batches of `--budget` tokens
(`train.max_tokens_per_microbatch`). The loss is a mean log-prob per sequence (POPO's and GRPO's losses
read the same tensors). Each method is warmed up once, then timed as the median of `--repeats` passes;
peak memory is that of one pass beyond what the process held before it (each method runs in a process of
its own; CPU: VmHWM; CUDA: the allocator's peak). The two losses must agree (same sequences, same
weights), or the comparison is void.

    python bench/bench_packing.py [--rows 8] [--budget 2048] [--limit 512] [--sequences 64]

Prints a table and writes bench/results/packing.json. On CPU a pack's attention runs per sequence
(model/packed_attention.py), as Transformer Engine's THD attention does on GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_logprobs import PeakMemory

from popo_megatron.launch import run_local
from popo_megatron.layout_plan import long_tailed_lengths

MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
    tie_word_embeddings=True,
)


def _build(hf: str):
    """The model at TP=1 with the HF weights, wrapped as the trainer wraps it."""
    from popo_megatron.config import load_config
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_model

    cfg = load_config(overrides=[f"model.hf_path={hf}", "optim.use_distributed_optimizer=false"])
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    model, args = load_hf_model(cfg)
    return wrap_ddp(model, args, cfg), args


def _measure(ddp, micro: list, settings, sequences: int, repeats: int) -> dict:
    """Forward and backward over `micro`, warmed up once: the median seconds of `repeats` passes, the peak
    memory of one, the loss."""
    from popo_megatron.algo.step import forward_backward

    losses: list[float] = []

    def loss_of(index, mb, logits, hidden):
        lp, _ = settings.logprobs(logits, mb, with_entropy=False)
        per_sequence = mb.per_sequence_sum(torch.where(mb.loss_mask, lp, 0.0))
        loss = -(per_sequence / mb.response_lengths().clamp(min=1)).sum() / sequences
        losses.append(float(loss.detach()))
        return loss  # this micro-batch's share of the batch's loss, as the objectives' losses are

    def one_pass() -> float:
        ddp.zero_grad_buffer()
        losses.clear()
        forward_backward(ddp, micro, loss_of, False)
        return sum(losses)

    one_pass()  # warm-up: allocator, first-touch of the activations
    with PeakMemory() as memory:
        loss = one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), peak_mib=memory.peak / 2**20, loss=loss)


def _worker(hf: str, ns: argparse.Namespace, method: str, out: str) -> None:
    """One method in a process of its own: its peak memory is not hidden by the other's freed pages."""
    from popo_megatron.algo.batch import make_policy_batch
    from popo_megatron.algo.step import Forwards, LogprobSettings

    ddp, args = _build(hf)
    gen = torch.Generator().manual_seed(ns.seed)
    responses = [torch.randint(1, MODEL["vocab_size"], (n,), generator=gen).tolist() for n in ns.response_lengths]
    prompts = [torch.randint(1, MODEL["vocab_size"], (ns.prompt,), generator=gen).tolist() for _ in responses]
    values = torch.ones(len(responses)).view(-1, 1)
    batch = make_policy_batch(prompts, responses, values, values > 0).trimmed()
    settings = LogprobSettings(args.vocab_size, 1.0, 1024)
    forwards = Forwards(ddp, settings, ns.rows, ns.budget if method == "packed" else None)
    micro = forwards.micro_batches(batch)
    real_tokens = int(batch.row_lengths().sum())
    computed = sum(mb.tokens.numel() for mb in micro)
    measured = _measure(ddp, micro, settings, batch.size, ns.repeats)
    row = dict(
        method=method,
        micro_batches=len(micro),
        widest=max(mb.tokens.shape[1] for mb in micro),
        computed_tokens=computed,
        real_tokens=real_tokens,
        padding_share=1 - real_tokens / computed,
        tokens_per_s=real_tokens / measured["seconds"],
        **measured,
    )
    Path(out).write_text(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--limit", type=int, default=512, help="the response length limit (rollout.max_tokens)")
    parser.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--rows", type=int, default=8, help="rows per padded micro-batch (train.micro_batch_size)")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per pack (train.max_tokens_per_microbatch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    ns = parser.parse_args()
    ns.response_lengths = long_tailed_lengths(ns.sequences, ns.limit, ns.limit / 8, 0.1, ns.seed)
    from popo_megatron.model.random_model import save_random_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        hf = save_random_hf_model(Path(tmp) / "model", "Qwen2Config", 0, **MODEL)
        rows = []
        for method in ("padded", "packed"):
            result = Path(tmp) / f"{method}.json"
            run_local(_worker, 1, str(hf), ns, method, str(result))
            rows.append(json.loads(result.read_text()))
    padded, packed = rows
    if not math.isclose(padded["loss"], packed["loss"], rel_tol=1e-4):
        raise SystemExit(f"the losses differ ({padded['loss']} vs {packed['loss']}): the comparison is void")
    lengths = sorted(ns.response_lengths)
    print(
        f"{ns.sequences} rollouts, prompt {ns.prompt} tokens, responses median {lengths[len(lengths) // 2]} / "
        f"limit {ns.limit} ({sum(n == ns.limit for n in lengths)} at it); model {MODEL['num_hidden_layers']} "
        f"layers x {MODEL['hidden_size']}; {torch.get_num_threads()} threads"
    )
    print(
        f"{'method':>7} {'micro':>5} {'widest':>6} {'computed':>8} {'padding':>7} {'s/pass':>7} "
        f"{'tokens/s':>8} {'peak MiB':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:>7} {r['micro_batches']:5d} {r['widest']:6d} {r['computed_tokens']:8d} "
            f"{r['padding_share']:7.0%} {r['seconds']:7.2f} {r['tokens_per_s']:8.0f} {r['peak_mib']:8.0f}"
        )
    speedup = packed["tokens_per_s"] / padded["tokens_per_s"]
    memory = packed["peak_mib"] / padded["peak_mib"]
    print(f"packed / padded: {speedup:.2f}x tokens per second, {memory:.2f}x peak memory")
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "packing.json"
    config = {k: v for k, v in vars(ns).items() if k != "out"}
    out.write_text(
        json.dumps({"config": config, "model": MODEL, "rows": rows, "speedup": speedup, "memory": memory}, indent=1)
        + "\n"
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
