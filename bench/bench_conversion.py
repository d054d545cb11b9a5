"""Benchmark: checkpoint conversion and the weight stream, each against its floor measured in the same run.

1. Conversion: `hf-to-mcore --tp 2` and `mcore-to-hf` of a synthetic >= 2 GB fp32 checkpoint, on one
   process and on two (torchrun: the ranks share the work). The floor is a warm copy of the conversion's
   own source (read once before, so the page cache is warm for both) into the same file system, each file
   fsynced as the converters fsync what they write before the output is renamed into place. Every
   measurement starts after `os.sync()`, so none pays for the previous one's writeback; floor and
   conversion alternate `--repeats` times; the table shows the best of each (noise only adds time) and
   the floor's own GB/s.
   The conversion's time is its own (`seconds`: the work); the process start-up (imports, torch's meta
   kernels) is the rest of the wall time, shown apart. Peak RSS is the largest rank's (VmHWM), against the
   bound 600 MiB + 10% of the checkpoint.
2. The weight stream at TP=2 (GB/s of full HF tensors produced on each rank) per bucket size, through
   each of its TP transports: memory the two local ranks share (the default on CPU) and gloo (what ranks
   on different hosts use). Against the raw gloo transport of the same bytes over the TP group, timed in
   the same processes: gloo all-gathers of flat buffers of the bucket size, and in-place broadcasts from
   each rank of the same buffers (the floor is the faster of the two); and against a memcpy of the same
   bytes. Streams and floors alternate `--repeats` times; each is the best of its repeats.

    python bench/bench_conversion.py [--size-gb 2.1] [--dir /dev/shm] [--repeats 3] [--out bench/results]
        [--parts conversion stream]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic_checkpoint import save_synthetic_hf_checkpoint

BUCKETS_MB = (16, 64, 256)

_CONVERT = """
import json, sys
from pathlib import Path
from popo_megatron.convert import offline
from popo_megatron.platform import global_rank, init_distributed
from popo_megatron.platform.memory import peak_rss_mib
function, src, out, kwargs, results = sys.argv[1:6]
if len(sys.argv) > 6:
    init_distributed()
stats = getattr(offline, function)(src, out, progress=False, **json.loads(kwargs))
Path(results, f"rank_{global_rank()}.json").write_text(json.dumps(dict(stats, peak_rss_mib=peak_rss_mib())))
"""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _warm(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def _copy_s(src: Path, dst: Path) -> float:
    """The floor: copy every file of `src` once, each fsynced as the converters fsync theirs (after the
    previous step's writes reached the file system)."""
    os.sync()
    start = time.perf_counter()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def _convert(script: Path, function: str, src: Path, out: Path, nproc: int, **kwargs) -> dict:
    """One conversion in fresh processes: its own seconds, the process wall time, the largest peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    results = out.parent / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    args = [function, str(src), str(out), json.dumps(kwargs), str(results)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command += [str(script), *args, "distributed"]
    else:
        command = [sys.executable, str(script), *args]
    os.sync()
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(f.read_text()) for f in sorted(results.glob("rank_*.json"))]
    assert len(ranks) == nproc, f"{len(ranks)} of {nproc} ranks reported"
    return dict(
        seconds=max(r["seconds"] for r in ranks),
        wall_s=wall,
        bytes=ranks[0]["bytes"],
        peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
    )


def measure_conversions(work: Path, total: int, repeats: int) -> list[dict]:
    script = work / "convert.py"
    script.write_text(_CONVERT)
    hf, mcore = work / "hf", work / "mcore"
    _convert(script, "hf_to_mcore", hf, mcore, 1, tp=2)  # the source of mcore-to-hf
    _warm(hf)
    _warm(mcore)
    rows = []
    for name, function, src, kwargs in (
        ("hf-to-mcore --tp 2", "hf_to_mcore", hf, dict(tp=2)),
        ("mcore-to-hf", "mcore_to_hf", mcore, {}),
    ):
        for nproc in (1, 2):
            copies, runs = [], []
            for _ in range(repeats):
                copies.append(_copy_s(src, work / "floor"))
                runs.append(_convert(script, function, src, work / "out", nproc, **kwargs))
            # The best of the repeats, for both: the machine's noise only ever adds time.
            copy_s = min(copies)
            seconds = min(r["seconds"] for r in runs)
            rows.append(
                dict(
                    name=name,
                    processes=nproc,
                    bytes=runs[0]["bytes"],
                    copy_s=copy_s,
                    copy_gb_s=_size(src) / 1e9 / copy_s,
                    seconds=seconds,
                    gb_s=runs[0]["bytes"] / 1e9 / seconds,
                    x_copy=seconds / copy_s,
                    startup_s=statistics.median(r["wall_s"] - r["seconds"] for r in runs),
                    peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
                    rss_bound_mib=600 + 0.1 * total / 2**20,
                    runs=runs,
                    copies_s=copies,
                )
            )
    shutil.rmtree(work / "out", ignore_errors=True)
    return rows


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure_stream(model, args, cfg, bucket_mb: int, repeats: int) -> dict:
    """The stream at one bucket size against its floors, each the best of `repeats` interleaved runs."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from popo_megatron.platform.shared_rows import shared_rows
    from popo_megatron.rollout.weight_stream import gather_in_place, iter_hf_weights

    group = parallel_state.get_tensor_model_parallel_group()
    bucket = bucket_mb * 2**20
    nbytes = sum(t.numel() * t.element_size() for _, t in iter_hf_weights(model, args, cfg, bucket))  # warm
    # What the default stream used (no collective: the slots it mapped are held, or known to be impossible).
    transport = "shared memory" if shared_rows(group, 1) is not None else "gloo"
    # Transport floors: the same bytes in flat buffers of the bucket size, reused, over the TP group.
    shard = torch.empty(bucket // 2 // 4)
    gathered = torch.empty(2 * shard.numel())
    rows_of = gathered.view(2, -1)
    count = max(1, round(nbytes / gathered.nbytes))
    dist.all_gather_into_tensor(gathered, shard, group=group)  # warm
    dist.broadcast(rows_of[0], src=dist.get_global_rank(group, 0), group=group)

    def stream():
        for _ in iter_hf_weights(model, args, cfg, bucket):
            pass

    def stream_gloo():
        for _ in iter_hf_weights(model, args, cfg, bucket, shared_memory=False):
            pass

    def all_gather():
        for _ in range(count):
            dist.all_gather_into_tensor(gathered, shard, group=group)

    def broadcasts():  # the stream's own transport call: on gloo, an in-place broadcast from each rank
        for _ in range(count):
            gather_in_place(rows_of, dist.get_rank(group), group)

    # Memory floor: one memcpy of the same bytes, in 256 MB pieces.
    source = torch.empty(64 * 2**20)
    target = torch.empty_like(source)
    target.copy_(source)
    pieces = max(1, nbytes // source.nbytes)

    def memcpy():
        for _ in range(pieces):
            target.copy_(source)

    # Interleaved, best of `repeats` for each: two ranks and gloo's threads on 2 cores make any single
    # pass noisy, and noise only ever adds time.
    stream_gloo()  # warm
    runs: dict[str, list[float]] = {"stream": [], "stream_gloo": [], "all_gather": [], "broadcasts": [], "memcpy": []}
    for _ in range(repeats):
        runs["stream"].append(_timed(stream))
        runs["stream_gloo"].append(_timed(stream_gloo))
        runs["all_gather"].append(_timed(all_gather) * nbytes / (count * gathered.nbytes))
        runs["broadcasts"].append(_timed(broadcasts) * nbytes / (count * gathered.nbytes))
        runs["memcpy"].append(_timed(memcpy) * nbytes / (pieces * source.nbytes))
    best = {f"{name}_s": min(seconds) for name, seconds in runs.items()}
    # The transport floor is the faster of the two ways to move the bytes.
    best["transport_s"] = min(best["all_gather_s"], best["broadcasts_s"])
    return dict(bucket_mb=bucket_mb, bytes=nbytes, transport=transport, **best, runs_s=runs)


def _stream_worker(hf_path: str, out_file: str, repeats: int) -> None:
    import torch.distributed as dist

    from popo_megatron.config import load_config
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_weights

    cfg = load_config(overrides=[f"model.hf_path={hf_path}", "parallel.tensor_model_parallel_size=2"])
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    args = read_hf_config(hf_path)
    model = build_gpt_model(args, cfg)
    load_hf_weights(model, hf_path, args, cfg)
    rows = [_measure_stream(model, args, cfg, bucket_mb, repeats) for bucket_mb in BUCKETS_MB]
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.1)
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints are written (a file system)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("conversion", "stream"),
        default=["conversion", "stream"],
        help="what to measure; the other part's results in the JSON are kept from its last run",
    )
    ns = parser.parse_args()
    out = ns.out / "conversion.json"
    result = json.loads(out.read_text()) if out.exists() else {}

    from popo_megatron.launch import run_local

    with tempfile.TemporaryDirectory(dir=ns.dir) as tmp:
        work = Path(tmp)
        print(f"writing a synthetic {ns.size_gb:.1f} GB checkpoint under {work} ...", flush=True)
        total = save_synthetic_hf_checkpoint(work / "hf", ns.size_gb)
        if "conversion" in ns.parts:
            result["conversions"] = measure_conversions(work, total, ns.repeats)
        if "stream" in ns.parts:
            print("weight stream at TP=2 ...", flush=True)
            run_local(_stream_worker, 2, str(work / "hf"), str(work / "stream.json"), ns.repeats)
            result["stream_tp2"] = json.loads((work / "stream.json").read_text())
        where = str(ns.dir or tempfile.gettempdir())
    result.update(checkpoint_bytes=total, directory=where, repeats=ns.repeats)
    conversions, stream = result.get("conversions", []), result.get("stream_tp2", [])

    print(f"\ncheckpoint: {total / 1e9:.2f} GB fp32 under {where}; best of {ns.repeats}")
    print(
        f"{'conversion':20s} {'procs':>5s} {'s':>6s} {'GB/s':>6s} {'copy s':>6s} {'copy GB/s':>9s} {'x copy':>6s} "
        f"{'start-up s':>10s} {'peak RSS MiB':>12s} {'bound':>6s}"
    )
    for c in conversions:
        print(
            f"{c['name']:20s} {c['processes']:5d} {c['seconds']:6.2f} {c['gb_s']:6.2f} {c['copy_s']:6.2f} "
            f"{c['copy_gb_s']:9.2f} {c['x_copy']:6.2f} {c['startup_s']:10.1f} {c['peak_rss_mib']:12.0f} "
            f"{c['rss_bound_mib']:6.0f}"
        )
    if stream:
        print(f"\nweight stream at TP=2; its default TP transport here: {stream[0]['transport']}")
    print(
        f"{'bucket MB':>9s} {'stream GB/s':>11s} {'via gloo GB/s':>13s} {'all-gather GB/s':>15s} "
        f"{'broadcasts GB/s':>15s} {'x transport':>11s} {'via gloo x':>10s} {'memcpy GB/s':>11s} {'x memcpy':>8s}"
    )
    for s in stream:
        s["x_transport"] = s["stream_s"] / s["transport_s"]
        s["gloo_x_transport"] = s["stream_gloo_s"] / s["transport_s"]
        s["x_memcpy"] = s["stream_s"] / s["memcpy_s"]
        gb = s["bytes"] / 1e9
        print(
            f"{s['bucket_mb']:9d} {gb / s['stream_s']:11.2f} {gb / s['stream_gloo_s']:13.2f} "
            f"{gb / s['all_gather_s']:15.2f} {gb / s['broadcasts_s']:15.2f} {s['x_transport']:11.2f} "
            f"{s['gloo_x_transport']:10.2f} {gb / s['memcpy_s']:11.2f} {s['x_memcpy']:8.2f}"
        )
    ns.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
