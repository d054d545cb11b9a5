"""Benchmark: the colocated vLLM engine on CPU: generated tokens/s for a few batch shapes, and update_weights.

One rank (a torchrun-like world of one, vLLM's external launcher, as in
training) on a tiny random Qwen2 (the shape of `popo parity`'s model):
prompts x responses per prompt x max tokens, with random 32-token prompts
and sampling at temperature 1 (no stop token is likely: responses run to the
limit). `update_weights` is timed on a larger random Qwen2 (~170 MB fp32)
against copying the same tensors in memory in the same run.

    python bench/bench_rollout.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(8, 4, 64), (32, 8, 64), (64, 8, 128)]  # prompts, responses per prompt, max tokens
MEDIUM_QWEN2 = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    eos_token_id=2,
)


def _worker(tiny: str, medium: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file

    from popo_megatron.config import load_config
    from popo_megatron.rollout.engine import SamplingSettings
    from popo_megatron.rollout.vllm_engine import vllm_engine

    def config(path, max_tokens):
        return load_config(
            overrides=[
                f"model.hf_path={path}",
                "rollout.max_model_len=256",
                "rollout.kv_cache_memory_mb=512",
                f"rollout.max_tokens={max_tokens}",
            ]
        )

    gen = torch.Generator().manual_seed(0)
    rows = []
    engine = vllm_engine(config(tiny, 128), tiny)
    engine.generate([[1, 2, 3]], SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_tokens=8, top_k=0), 0)  # warm-up
    for prompts, n, max_tokens in SHAPES:
        batch = [torch.randint(0, 1000, (32,), generator=gen).tolist() for _ in range(prompts)]
        sampling = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, top_k=0)
        result = engine.generate(batch, sampling, 1)
        rows.append(
            dict(
                prompts=prompts,
                n=n,
                max_tokens=max_tokens,
                seconds=result.seconds,
                generated_tokens=result.generated_tokens,
                tokens_per_s=result.tokens_per_s,
            )
        )
    engine.shutdown()

    engine = vllm_engine(config(medium, 16), medium)
    tensors = {}
    for shard in sorted(Path(medium).glob("*.safetensors")):
        tensors.update(load_file(shard))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    update, copy = [], []
    for _ in range(3):
        start = time.perf_counter()
        engine.update_weights(iter(tensors.items()))
        update.append(time.perf_counter() - start)
        start = time.perf_counter()
        _ = [t.clone() for t in tensors.values()]
        copy.append(time.perf_counter() - start)
    engine.shutdown()
    reload = dict(bytes=nbytes, update_s=min(update), copy_s=min(copy))
    Path(out).write_text(json.dumps({"generate": rows, "update_weights": reload}))


def main() -> int:
    from popo_megatron.launch import run_local
    from popo_megatron.model.random_model import TINY_QWEN2, save_random_hf_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_random_hf_model(Path(tmp) / "tiny", **TINY_QWEN2, eos_token_id=2)
        medium = save_random_hf_model(Path(tmp) / "medium", **MEDIUM_QWEN2)
        raw = Path(tmp) / "result.json"
        run_local(_worker, 1, str(tiny), str(medium), str(raw))
        result = json.loads(raw.read_text())
    print(f"{'prompts':>7s} {'n':>3s} {'max tokens':>10s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for r in result["generate"]:
        print(
            f"{r['prompts']:7d} {r['n']:3d} {r['max_tokens']:10d} {r['generated_tokens']:7d} "
            f"{r['seconds']:8.2f} {r['tokens_per_s']:9.0f}"
        )
    u = result["update_weights"]
    gb = u["bytes"] / 1e9
    print(
        f"\nupdate_weights: {gb:.3f} GB in {u['update_s']:.3f}s = {u['update_s'] / gb:.2f} s/GB; "
        f"copying the same tensors: {u['copy_s']:.3f}s ({u['update_s'] / u['copy_s']:.1f}x)"
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "rollout.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
