"""Benchmark for the GPU check: training throughput and MFU of a Qwen2.5-0.5B-shaped model, and the twin's EMA
and swap against a device-to-device copy of the same bytes.

One rank, the local (torch) layer spec, random bf16 weights, micro-batches of `--micro-batch` rows of
`--seq` tokens. Forward and backward through Megatron's schedule (`model.forward.forward_logits` with a
scalar loss) after a warm-up, timed with the device synchronised; tokens/s, and MFU against `--peak-tflops`
(the H200's dense bf16 peak by default) from the usual count of 6 x parameters + 12 x layers x hidden x
sequence FLOPs per token. The EMA target (fp32, `popo.target`): one EMA update and one swap in and out, each as
GB/s of the twin's bytes, next to a copy of a buffer of the same size on the same device (the floor, with
its own GB/s). Writes OUT/gpu_step.json and prints a table.

    python bench/bench_gpu_step.py --out OUT                 # on a GPU (scripts/device_check.sh)
    python bench/bench_gpu_step.py --tiny --out OUT          # anywhere: a tiny shape, to keep the code honest
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from public_shapes import PUBLIC_SHAPES

from popo_megatron.model.random_model import TINY_QWEN2

# --tiny: the random model `popo parity` uses, for a run that needs no GPU
TINY = dict(architectures=["Qwen2ForCausalLM"], **TINY_QWEN2)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Best seconds of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def _worker(shape: dict, seq: int, micro_batch: int, micro_batches: int, peak_tflops: float, out: str) -> None:
    import torch

    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.config import load_config
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.forward import forward_logits
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.platform import init_model_parallel, seed_everything

    with tempfile.TemporaryDirectory() as hf:
        (Path(hf) / "config.json").write_text(json.dumps(shape))
        cfg = load_config(overrides=[f"model.hf_path={hf}", "model.params_dtype=bfloat16", "model.spec=local"])
        init_model_parallel(cfg.parallel)
        seed_everything(0)
        args = read_hf_config(hf)
        model = build_gpt_model(args, cfg)
    with torch.no_grad():
        for param in model.parameters():  # random weights (the builder leaves them to a checkpoint)
            param.normal_(0.0, 0.02)
    ddp = wrap_ddp(model, args, cfg)
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(
        0, args.vocab_size, (micro_batch * micro_batches, seq), generator=torch.Generator().manual_seed(0)
    )

    def train_pass() -> None:
        ddp.zero_grad_buffer()
        forward_logits(ddp, tokens, loss_fn=lambda logits: logits.float().mean(), num_microbatches=micro_batches)

    seconds = _timed(train_pass, repeats=3)
    tokens_per_s = tokens.numel() / seconds
    flops_per_token = 6 * params + 12 * args.num_layers * args.hidden_size * seq
    achieved_tflops = tokens_per_s * flops_per_token / 1e12

    twin = TwinParams(ddp)
    gb = twin.nbytes / 1e9
    ema_s = _timed(lambda: twin.update(0.99), repeats=5)

    def swap() -> None:
        with twin.swapped_in():
            pass

    swap_s = _timed(swap, repeats=5)
    source = torch.empty(twin.nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = _timed(lambda: target.copy_(source), repeats=5)
    result = dict(
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        params=params,
        seq=seq,
        micro_batch=micro_batch,
        micro_batches=micro_batches,
        train_tokens_per_s=tokens_per_s,
        train_tflops=achieved_tflops,
        peak_tflops=peak_tflops,
        mfu=achieved_tflops / peak_tflops,
        twin_gb=gb,
        ema_gb_s=gb / ema_s,
        swap_gb_s=gb / swap_s,
        copy_gb_s=gb / copy_s,
        ema_x_copy=ema_s / copy_s,
        swap_x_copy=swap_s / copy_s,
    )
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    from popo_megatron.launch import run_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and short sequences (no GPU needed)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    ns = parser.parse_args()
    shape, seq = (TINY, 64) if ns.tiny else (PUBLIC_SHAPES["qwen2.5-0.5b"], ns.seq)
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "gpu_step.json"
    run_local(_worker, 1, shape, seq, ns.micro_batch, ns.micro_batches, ns.peak_tflops, str(out))
    r = json.loads(out.read_text())
    print(f"{r['device']}: {r['params'] / 1e6:.0f}M parameters, {r['micro_batches']} x {r['micro_batch']} x {seq}")
    print(f"forward + backward: {r['train_tokens_per_s']:,.0f} tokens/s, {r['train_tflops']:.1f} TFLOP/s, ", end="")
    print(f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}")
    print(f"twin ({r['twin_gb']:.2f} GB fp32): EMA {r['ema_gb_s']:.1f} GB/s ({r['ema_x_copy']:.2f}x a copy), ", end="")
    print(f"swap {r['swap_gb_s']:.1f} GB/s ({r['swap_x_copy']:.2f}x); device copy {r['copy_gb_s']:.1f} GB/s")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
