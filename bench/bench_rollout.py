"""Benchmark: the colocated vLLM engine on CPU: generated tokens/s for a few batch shapes, update_weights, and
the engine against `transformers` `generate` on a real model.

One rank (a torchrun-like world of one, vLLM's external launcher, as in
training) on a tiny random Qwen2 (the shape of `popo parity`'s model):
prompts x responses per prompt x max tokens, with random 32-token prompts
and sampling at temperature 1 (no stop token is likely: responses run to the
limit). `update_weights` is timed on a larger random Qwen2 (~170 MB fp32)
against copying the same tensors in memory in the same run.

With `--smollm2`: SmolLM2-135M-Instruct (`popo pretrained`, fp32), 8 chat-formatted
arithmetic prompts x 8 samples x 64 tokens at temperature 1, every response
forced to its full length (vLLM `ignore_eos`, transformers `min_new_tokens`)
so both produce the same 4096 tokens. Each engine runs in its own process
(vLLM fixes the process's thread count when it starts), at 1 and at 2 threads;
the best of 2 timed runs after a warm-up. The trainer's ranks run 1 thread
unless `rollout.cpu_threads` says otherwise.

    python bench/bench_rollout.py [--smollm2] [--out bench/results]
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


SMOLLM2_SHAPE = (8, 8, 64)  # prompts, samples per prompt, tokens per sample (every sample to its full length)
THREADS = (1, 2)


def _smollm2_prompts(model: str) -> list[list[int]]:
    """Chat-formatted arithmetic questions, rendered as the trainer renders them."""
    from transformers import AutoTokenizer

    from popo_megatron.data.prompts import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    questions = [f"What is {a} + {b}?" for a, b in zip(range(11, 19), range(47, 55), strict=True)]
    return [render_prompt(q, tokenizer, None, "Put the final answer within \\boxed{}.") for q in questions]


def _smollm2_worker(model: str, engine: str, threads: int, out: str) -> None:
    """Seconds of the best of 2 timed generations of SMOLLM2_SHAPE by `engine` at `threads` threads."""
    import torch

    prompts = _smollm2_prompts(model)
    prompt_count, n, tokens = SMOLLM2_SHAPE
    times = []
    if engine == "vllm":
        from vllm import SamplingParams

        from popo_megatron.config import load_config
        from popo_megatron.rollout.vllm_engine import vllm_engine

        cfg = load_config(
            overrides=[
                f"model.hf_path={model}",
                "rollout.max_model_len=256",
                "rollout.kv_cache_memory_mb=512",
                f"rollout.cpu_threads={threads}",
            ]
        )
        llm = vllm_engine(cfg, model).llm  # the trainer's engine; called directly to force full lengths
        requests = [{"prompt_token_ids": p} for p in prompts]
        for attempt in range(3):  # a warm-up, then two timed runs
            params = [
                SamplingParams(
                    n=n,
                    temperature=1.0,
                    max_tokens=tokens,
                    ignore_eos=True,
                    seed=attempt * 100 + i,
                    logprobs=0,
                    detokenize=False,
                )
                for i in range(prompt_count)
            ]
            start = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
            produced = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(model)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded, as generate needs
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        for attempt in range(3):
            torch.manual_seed(attempt)
            start = time.perf_counter()
            with torch.no_grad():
                generated = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    num_return_sequences=n,
                    pad_token_id=pad,
                )
            times.append(time.perf_counter() - start)
            produced = (generated.shape[1] - width) * generated.shape[0]
    assert produced == prompt_count * n * tokens, f"{engine} produced {produced} tokens"
    Path(out).write_text(json.dumps(dict(engine=engine, threads=threads, tokens=produced, seconds=min(times[1:]))))


def _smollm2_comparison(tmp: Path) -> list[dict]:
    from popo_megatron.launch import run_local
    from popo_megatron.model.pretrained import build_smollm2

    model = str(build_smollm2())
    rows = []
    for threads in THREADS:
        for engine in ("transformers", "vllm"):
            raw = tmp / f"{engine}_{threads}.json"
            run_local(_smollm2_worker, 1, model, engine, threads, str(raw))
            row = json.loads(raw.read_text())
            rows.append({**row, "tokens_per_s": row["tokens"] / row["seconds"]})
    return rows


def _report_smollm2(rows: list[dict]) -> None:
    prompts, n, tokens = SMOLLM2_SHAPE
    print(f"\nSmolLM2-135M-Instruct, {prompts} prompts x {n} samples x {tokens} tokens (fp32, full lengths):")
    print(f"{'threads':>7s} {'transformers tok/s':>19s} {'vLLM tok/s':>11s} {'vLLM / transformers':>20s}")
    for threads in THREADS:
        hf, vllm = (
            next(r for r in rows if r["engine"] == e and r["threads"] == threads) for e in ("transformers", "vllm")
        )
        print(
            f"{threads:7d} {hf['tokens_per_s']:19.0f} {vllm['tokens_per_s']:11.0f} "
            f"{vllm['tokens_per_s'] / hf['tokens_per_s']:19.2f}x"
        )


def main() -> int:
    from popo_megatron.launch import run_local
    from popo_megatron.model.random_model import TINY_QWEN2, save_random_hf_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--smollm2", action="store_true", help="also vLLM against transformers on SmolLM2-135M")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_random_hf_model(Path(tmp) / "tiny", **TINY_QWEN2, eos_token_id=2)
        medium = save_random_hf_model(Path(tmp) / "medium", **MEDIUM_QWEN2)
        raw = Path(tmp) / "result.json"
        run_local(_worker, 1, str(tiny), str(medium), str(raw))
        result = json.loads(raw.read_text())
        if ns.smollm2:
            result["smollm2"] = _smollm2_comparison(Path(tmp))
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
    if ns.smollm2:
        _report_smollm2(result["smollm2"])
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "rollout.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
