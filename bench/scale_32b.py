"""Qwen2.5-32B on paper: conversion time, weight-sync bytes and per-GPU memory at the example's layout.

EXTRAPOLATED, not measured: no GPU cluster has run this project. The inputs are
the model's public shape (bench/public_shapes.py), the layout of
examples/qwen2.5-32b_popo.yaml (TP 8 x PP 2 x DP 2 on 32 GPUs, vLLM TP 4) and
what bench/bench_conversion.py measured on this machine
(bench/results/conversion.json): each conversion's time as a multiple of a copy
of the same bytes. A conversion on the cluster is then that multiple of a copy
at the cluster file system's bandwidth, for a few assumed bandwidths.

The weight sync's bytes follow from popo_megatron/rollout/weight_stream.py:
every rank receives every tensor (each TP rank's row of a bucket is broadcast
to the matching TP rank of the other stages, then every stage all-gathers the
rows in its TP group), as the colocated vLLM rank needs full HF tensors to cut
its own shard. Per-GPU memory is the
formula of docs/slurm.md (bf16 weights and fp32 gradients over TP x PP; the
distributed optimiser's fp32 master and Adam moments and the fp32 twin also
over DP) plus the vLLM rank's bf16 weights over its TP; activations and the KV
cache come on top.

    python bench/scale_32b.py      # prints the table, writes bench/results/scale_32b.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_twin_memory import total_params
from public_shapes import PUBLIC_SHAPES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples/qwen2.5-32b_popo.yaml"
WORLD = 32  # the example's 4 nodes x 8 GPUs
FILESYSTEM_GB_S = (1.0, 2.0, 5.0)  # assumed copy rates (bytes copied per second) of a cluster file system
GB = 1e9


def plan(conversion: dict) -> dict:
    from popo_megatron.config import load_config
    from popo_megatron.model.hf_config import read_hf_config

    with tempfile.TemporaryDirectory() as hf:
        (Path(hf) / "config.json").write_text(json.dumps(PUBLIC_SHAPES["qwen2.5-32b"]))
        params = total_params(read_hf_config(hf))
    cfg = load_config(EXAMPLE)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp, engine_tp = WORLD // (tp * pp), cfg.rollout.tensor_parallel_size
    bf16 = 2 * params  # the checkpoint's and the stream's bytes
    # As the README reports them: against the best copy of the same source files measured in the run.
    best_copy = {}
    for c in conversion["conversions"]:
        best_copy[c["name"]] = min(best_copy.get(c["name"], float("inf")), c["copy_s"])
    ratios = {
        f"{c['name']} ({c['processes']} proc)": c["seconds"] / best_copy[c["name"]] for c in conversion["conversions"]
    }
    memory = {
        "weights_bf16": 2 * params / (tp * pp),
        "grads_fp32": 4 * params / (tp * pp),
        "adam_fp32_sliced": 12 * params / (tp * pp * dp),
        "twin_fp32_sliced": 4 * params / (tp * pp * dp),
        "vllm_weights_bf16": 2 * params / engine_tp,
        # the gathered rows, and up to 3 arenas of HF tensors that the engine may still hold
        "sync_buckets": 4 * cfg.train.weight_sync_bucket_mb * 2**20,
    }
    return dict(
        extrapolated=True,
        params=params,
        layout=dict(world=WORLD, tp=tp, pp=pp, dp=dp, vllm_tp=engine_tp),
        checkpoint_gb=bf16 / GB,
        conversion_x_copy=ratios,
        conversion_s={
            name: {f"{fs:g} GB/s": ratio * bf16 / GB / fs for fs in FILESYSTEM_GB_S} for name, ratio in ratios.items()
        },
        sync_gb_per_rank=dict(
            own_shard=bf16 / (tp * pp) / GB,
            tp_all_gather_received=bf16 * (tp - 1) / tp / GB,
            pp_broadcast_received=bf16 * (pp - 1) / pp / tp / GB,
            hf_tensors_handed_to_vllm=bf16 / GB,
        ),
        memory_gb_per_gpu={k: v / GB for k, v in memory.items()} | {"total": sum(memory.values()) / GB},
    )


def report(result: dict) -> None:
    layout = result["layout"]
    print(
        f"Qwen2.5-32B, EXTRAPOLATED (not measured): {result['params'] / 1e9:.2f} B parameters, "
        f"{result['checkpoint_gb']:.1f} GB in bf16; TP {layout['tp']} x PP {layout['pp']} x DP {layout['dp']} "
        f"on {layout['world']} GPUs, vLLM TP {layout['vllm_tp']}\n"
    )
    speeds = list(next(iter(result["conversion_s"].values())))
    print("| conversion | x copy (measured here) | " + " | ".join(f"copy at {s}" for s in speeds) + " |")
    print("|---|---|" + "---|" * len(speeds))
    for name, times in result["conversion_s"].items():
        cells = " | ".join(f"{t / 60:.1f} min" for t in times.values())
        print(f"| {name} | {result['conversion_x_copy'][name]:.2f} | {cells} |")
    print("\n| weight sync, per rank and step | GB |\n|---|---|")
    for name, gb in result["sync_gb_per_rank"].items():
        print(f"| {name.replace('_', ' ')} | {gb:.1f} |")
    print("\n| per-GPU memory | GB |\n|---|---|")
    for name, gb in result["memory_gb_per_gpu"].items():
        print(f"| {name.replace('_', ' ')} | {gb:.1f} |")
    print("(activations and vLLM's KV cache come on top)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results")
    ns = parser.parse_args()
    conversion = json.loads((ns.results / "conversion.json").read_text())
    result = plan(conversion)
    report(result)
    (ns.results / "scale_32b.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {ns.results / 'scale_32b.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
