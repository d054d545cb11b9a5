"""Benchmark: checkpoint conversion and the weight stream, against their physical floors.

1. `hf-to-mcore` and `mcore-to-hf` of a synthetic >= 2 GB checkpoint (each in
   its own process, timed by the converter, peak RSS from VmHWM), side by side
   with copying the same files in the same run (warm page cache for all).
2. The weight stream at TP=2 (GB/s of full HF tensors produced on each rank)
   per bucket size, side by side with a plain memcpy of the same bytes.

    python bench/bench_conversion.py [--size-gb 2.1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic_checkpoint import save_synthetic_hf_checkpoint

BUCKETS_MB = (16, 64, 256, 1024)

_CONVERT = """
import json, sys
from popo_megatron.convert import offline
from popo_megatron.platform.memory import peak_rss_mib
stats = getattr(offline, sys.argv[1])(*sys.argv[2:4], progress=False, **json.loads(sys.argv[4]))
print("RESULT", json.dumps(dict(stats, peak_rss_mib=peak_rss_mib())))
"""


def _convert(function: str, src: Path, out: Path, **kwargs) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT, function, str(src), str(out), json.dumps(kwargs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.split("RESULT", 1)[1])


def _copy_seconds(src: Path, dst: Path) -> float:
    """The floor: copy every file of `src` (recursively) once."""
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def _stream_worker(hf_path: str, out_file: str) -> None:
    import torch.distributed as dist

    from popo_megatron.config import load_config
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.rollout.weight_stream import iter_hf_weights
    from popo_megatron.weights import load_hf_weights

    cfg = load_config(overrides=[f"model.hf_path={hf_path}", "parallel.tensor_model_parallel_size=2"])
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    args = read_hf_config(hf_path)
    model = build_gpt_model(args, cfg)
    load_hf_weights(model, hf_path, args, cfg)
    rows = []
    for bucket_mb in BUCKETS_MB:
        dist.barrier()
        start = time.perf_counter()
        nbytes = sum(t.numel() * t.element_size() for _, t in iter_hf_weights(model, args, cfg, bucket_mb * 2**20))
        stream_s = time.perf_counter() - start
        # The floor: one memcpy of the same number of bytes, in 256 MB pieces.
        src = torch.empty(64 * 2**20)
        dst = torch.empty_like(src)
        start = time.perf_counter()
        for _ in range(max(1, nbytes // src.nbytes)):
            dst.copy_(src)
        memcpy_s = (time.perf_counter() - start) * nbytes / (max(1, nbytes // src.nbytes) * src.nbytes)
        rows.append(dict(bucket_mb=bucket_mb, bytes=nbytes, stream_s=stream_s, memcpy_s=memcpy_s))
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ns = parser.parse_args()

    from popo_megatron.launch import run_local

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing a synthetic {ns.size_gb:.1f} GB checkpoint ...", flush=True)
        total = save_synthetic_hf_checkpoint(tmp / "hf", ns.size_gb)
        _copy_seconds(tmp / "hf", tmp / "warm")  # warm the page cache for every measurement
        conversions = []
        copy_hf = _copy_seconds(tmp / "hf", tmp / "hf_copy")
        to_mcore = _convert("hf_to_mcore", tmp / "hf", tmp / "mcore", tp=2)
        conversions.append(dict(name="hf-to-mcore (TP=2)", copy_s=copy_hf, **to_mcore))
        copy_mcore = _copy_seconds(tmp / "mcore", tmp / "mcore_copy")
        to_hf = _convert("mcore_to_hf", tmp / "mcore", tmp / "export")
        conversions.append(dict(name="mcore-to-hf", copy_s=copy_mcore, **to_hf))
        shutil.rmtree(tmp / "hf_copy")
        shutil.rmtree(tmp / "mcore_copy")
        print("weight stream at TP=2 ...", flush=True)
        run_local(_stream_worker, 2, str(tmp / "hf"), str(tmp / "stream.json"))
        stream = json.loads((tmp / "stream.json").read_text())

    gb = total / 1e9
    print(f"\ncheckpoint: {gb:.2f} GB fp32")
    print(f"{'conversion':22s} {'s':>7s} {'GB/s':>6s} {'copy s':>7s} {'x copy':>7s} {'peak RSS MiB':>12s}")
    for c in conversions:
        c["x_copy"] = c["seconds"] / c["copy_s"]
        print(
            f"{c['name']:22s} {c['seconds']:7.2f} {c['bytes'] / 1e9 / c['seconds']:6.2f} {c['copy_s']:7.2f} "
            f"{c['x_copy']:7.2f} {c['peak_rss_mib']:12.0f}"
        )
    print(f"\n{'stream bucket MB':>16s} {'GB/s':>6s} {'memcpy GB/s':>11s} {'x memcpy':>8s}")
    for s in stream:
        s["x_memcpy"] = s["stream_s"] / s["memcpy_s"]
        print(
            f"{s['bucket_mb']:16d} {s['bytes'] / 1e9 / s['stream_s']:6.2f} {s['bytes'] / 1e9 / s['memcpy_s']:11.2f} "
            f"{s['x_memcpy']:8.2f}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    out = ns.out / "conversion.json"
    out.write_text(json.dumps(dict(checkpoint_bytes=total, conversions=conversions, stream_tp2=stream), indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
