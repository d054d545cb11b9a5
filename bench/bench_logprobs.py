"""Benchmark: chunked vocab-parallel log-probs (forward + backward) vs the naive gathered log_softmax.

Qwen's vocabulary (151,936), bf16 logits as the output layer produces them,
several token counts. Both methods run in the same process, on the same
logits, one after the other; each time is the median of a few repetitions.
Memory is the peak of forward + backward beyond the logits already held: on
CUDA from the allocator's peak, on CPU from the process's peak RSS (VmHWM,
reset before each measurement). Both include the bf16 gradient of the logits
(tokens x vocab x 2 bytes), which any method must produce; the chunked
method's bound is that gradient plus two fp32 [chunk, vocab] temporaries.
With entropy: the naive method computes it from the full softmax, the chunked
one in the same pass.

    python bench/bench_logprobs.py [--tokens 512 1024 2048] [--chunk 1024] [--out bench/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from popo_megatron.algo.logprobs import vocab_parallel_logprobs
from popo_megatron.platform import cuda_available

VOCAB = 151_936


def naive(logits: torch.Tensor, targets: torch.Tensor, entropy: bool):
    log_probs = logits.float().log_softmax(-1)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked, (-(log_probs.exp() * log_probs).sum(-1) if entropy else None)


def chunked(chunk: int):
    def run(logits: torch.Tensor, targets: torch.Tensor, entropy: bool):
        return vocab_parallel_logprobs(logits, targets, VOCAB, chunk_tokens=chunk, with_entropy=entropy)

    return run


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated during the block beyond those allocated at its start."""

    def __enter__(self):
        gc.collect()
        if cuda_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if cuda_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.start
        return False


def measure(method, logits, targets, grad_lp, grad_ent, entropy: bool, repeats: int) -> dict:
    def once():
        logits.grad = None
        lp, ent = method(logits, targets, entropy)
        outputs, grads = [lp], [grad_lp]
        if entropy:
            outputs.append(ent)
            grads.append(grad_ent)
        torch.autograd.backward(outputs, grads)
        if cuda_available():
            torch.cuda.synchronize()
        return lp.detach()

    once()  # warm-up (allocator, kernels)
    logits.grad = None
    gc.collect()
    with PeakMemory() as memory:
        result = once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    logits.grad = None
    return {"seconds": statistics.median(times), "peak_extra_bytes": memory.peak, "logprobs": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked method")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    ns = parser.parse_args()
    device = torch.device("cuda") if cuda_available() else torch.device("cpu")
    rows = []
    header = (
        f"{'tokens':>6} {'entropy':>7} {'naive s':>8} {'chunked s':>9} {'time ratio':>10} "
        f"{'naive MiB':>10} {'chunked MiB':>11} {'chunk bound MiB':>15} {'max |diff|':>10}"
    )
    print(f"vocab {VOCAB}, bf16 logits, chunk {ns.chunk} tokens, device {device}, {torch.get_num_threads()} threads")
    print(header)
    for tokens in ns.tokens:
        gen = torch.Generator().manual_seed(tokens)
        logits = (4 * torch.randn(tokens, VOCAB, generator=gen)).to(device, torch.bfloat16).requires_grad_()
        targets = torch.randint(0, VOCAB, (tokens,), generator=gen).to(device)
        grad_lp = torch.randn(tokens, generator=gen).to(device)
        grad_ent = torch.randn(tokens, generator=gen).to(device)
        for entropy in (False, True):
            base = measure(naive, logits, targets, grad_lp, grad_ent, entropy, ns.repeats)
            mine = measure(chunked(ns.chunk), logits, targets, grad_lp, grad_ent, entropy, ns.repeats)
            # The logits' bf16 gradient, and two fp32 [chunk, vocab] temporaries at a time
            # (the upcast chunk and its exponentials).
            bound = tokens * VOCAB * 2 + 2 * min(ns.chunk, tokens) * VOCAB * 4
            row = {
                "tokens": tokens,
                "entropy": entropy,
                "naive_s": base["seconds"],
                "chunked_s": mine["seconds"],
                "time_ratio": mine["seconds"] / base["seconds"],
                "naive_peak_extra_mib": base["peak_extra_bytes"] / 2**20,
                "chunked_peak_extra_mib": mine["peak_extra_bytes"] / 2**20,
                "chunk_bound_mib": bound / 2**20,
                "max_abs_diff": (base["logprobs"].float() - mine["logprobs"].float()).abs().max().item(),
            }
            rows.append(row)
            print(
                f"{tokens:6d} {str(entropy):>7} {row['naive_s']:8.3f} {row['chunked_s']:9.3f} "
                f"{row['time_ratio']:10.2f} {row['naive_peak_extra_mib']:10.0f} {row['chunked_peak_extra_mib']:11.0f} "
                f"{row['chunk_bound_mib']:15.0f} {row['max_abs_diff']:10.1e}"
            )
        del logits
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "logprobs.json"
    meta = {"vocab": VOCAB, "chunk_tokens": ns.chunk, "device": str(device), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
