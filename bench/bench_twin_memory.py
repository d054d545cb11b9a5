"""Benchmark: twin memory per rank for 7B- and 32B-shaped models at TP x DP, from the real sharding code.

No machine of that size is needed: one process plays rank 0 of the whole
world over torch's fake process group, and every tensor lives on the meta
device, so Megatron builds the real model stage (GPTModel at the layout), the
real DDP buffers and buckets (the distributed optimiser's padding and
slicing), and popo's TwinParams takes its real slice of them, all without
allocating memory. The table compares the twin with the parameters of the
same rank and with the ideal P x bytes / (TP x PP x DP).

    python bench/bench_twin_memory.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from public_shapes import PUBLIC_SHAPES

# (shape, TP, DP): TP=8 needs the heads divisible by 8 (Qwen2.5-7B has 28 heads: TP=4).
RUNS = [("llama2-7b", 8, 4), ("qwen2.5-7b", 4, 4), ("qwen2.5-32b", 8, 4)]


def measure(shape: str, tp: int, dp: int) -> dict:
    """Rank 0 of a fake TP x DP world: the twin of its real model stage, all on the meta device."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from popo_megatron.algo.twin import TwinParams
    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.training import wrap_ddp
    from popo_megatron.platform import apply_compat

    apply_compat()
    # Megatron places buffers on torch.cuda.current_device(): make that the meta device for this process.
    torch.cuda.current_device = lambda: "meta"
    dist.init_process_group("fake", rank=0, world_size=tp * dp, store=FakeStore())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    with tempfile.TemporaryDirectory() as hf:
        (Path(hf) / "config.json").write_text(json.dumps(PUBLIC_SHAPES[shape]))
        args = read_hf_config(hf)
        result = {"shape": shape, "tp": tp, "dp": dp}
        for sliced in (True, False):
            cfg = load_config(
                overrides=[
                    f"model.hf_path={hf}",
                    "model.params_dtype=bfloat16",
                    f"parallel.tensor_model_parallel_size={tp}",
                    f"optim.use_distributed_optimizer={sliced}",
                ]
            )
            validate_config(cfg, tp * dp, args)
            with torch.device("meta"):
                model = build_gpt_model(args, cfg)
                ddp = wrap_ddp(model, args, cfg)
            params = sum(p.numel() for p in model.parameters())
            result["rank_params"] = params
            result["rank_param_gib_bf16"] = params * 2 / 2**30
            for dtype in (torch.float32, torch.bfloat16):
                twin = TwinParams(ddp, dtype=dtype)
                key = f"twin_{'sliced' if sliced else 'whole'}_{str(dtype).removeprefix('torch.')}_gib"
                result[key] = twin.nbytes / 2**30
        total = total_params(args)
        result["model_params"] = total
        result["ideal_fp32_gib"] = total * 4 / (tp * dp) / 2**30
    return result


def total_params(args) -> int:
    """P of the whole (unsharded) HF model, for the ideal column."""
    h, kv = args.hidden_size, args.num_kv_heads * args.head_dim
    attention = h * args.num_attention_heads * args.head_dim * 2 + 2 * h * kv + (h + 2 * kv) * args.qkv_bias
    layer = attention + 3 * h * args.intermediate_size + 2 * h
    embeddings = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return args.num_layers * layer + embeddings + h


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "TP", "DP"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.one:  # a child process: one fake world per process
        shape, tp, dp = ns.one
        print(json.dumps(measure(shape, int(tp), int(dp))))
        return 0
    rows = []
    print(
        f"{'shape':12s} {'TP':>3s} {'DP':>3s} {'params':>8s} {'rank params':>12s} {'twin fp32':>10s} "
        f"{'twin bf16':>10s} {'unsliced fp32':>13s} {'ideal fp32':>10s} {'twin/ideal':>10s}"
    )
    for shape, tp, dp in RUNS:
        child = subprocess.run(
            [sys.executable, __file__, "--one", shape, str(tp), str(dp)], capture_output=True, text=True, check=False
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{shape:12s} {tp:3d} {dp:3d} {row['model_params'] / 1e9:7.2f}B {row['rank_param_gib_bf16']:8.2f} GiB "
            f"{row['twin_sliced_float32_gib']:6.2f} GiB {row['twin_sliced_bfloat16_gib']:6.2f} GiB "
            f"{row['twin_whole_float32_gib']:9.2f} GiB {row['ideal_fp32_gib']:6.2f} GiB "
            f"{row['twin_sliced_float32_gib'] / row['ideal_fp32_gib']:10.3f}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "twin_memory.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nper rank (rank 0; every rank of a layout holds the same amount); written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
