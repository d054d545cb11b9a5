"""`popo convert` streams both ways: peak memory stays within 600 MiB + 10% of the checkpoint.

The process imports torch (~0.3 GiB) and holds a few tensors at a time (the largest, the embedding, is
131 MB here); the checkpoint is 2.0 GiB, and holding it, or one of its 1 GiB output shards, would break the
bound. The bound is the one the conversion promises (README, bench/bench_conversion.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from synthetic_checkpoint import save_synthetic_hf_checkpoint

from popo_megatron.checkpoint.format import read_checkpoint

CHECKPOINT_GB = 2.1

# VmHWM read independently of the command's own report (which uses the same source).
_MEASURE = """
import sys
from pathlib import Path
from popo_megatron.cli import main
rc = main(sys.argv[1:])
hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
print("PEAK_RSS_KIB", hwm.split()[1])
sys.exit(rc)
"""


def _peak_rss_mib(*command: str) -> float:
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    return int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0]) / 1024


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    hf = tmp_path_factory.mktemp("large") / "hf"
    total = save_synthetic_hf_checkpoint(hf, CHECKPOINT_GB)
    assert total >= 2e9
    return hf, total


def test_both_directions_stream_within_the_memory_bound(large_checkpoint, tmp_path):
    hf, total = large_checkpoint
    bound = 600 + 0.1 * total / 2**20
    mcore, export = tmp_path / "mcore", tmp_path / "export"
    to_mcore = _peak_rss_mib("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mcore), "--tp", "2", "--quiet")
    to_hf = _peak_rss_mib("convert", "mcore-to-hf", "--ckpt", str(mcore), "--out", str(export), "--quiet")
    print(f"checkpoint {total / 2**20:.0f} MiB; peak RSS hf-to-mcore {to_mcore:.0f}, mcore-to-hf {to_hf:.0f} MiB")
    assert to_mcore < bound, f"hf-to-mcore peak RSS {to_mcore:.0f} MiB > {bound:.0f} MiB"
    assert to_hf < bound, f"mcore-to-hf peak RSS {to_hf:.0f} MiB > {bound:.0f} MiB (1 GiB output shards)"
    info, args = read_checkpoint(mcore)
    assert info.tensor_model_parallel_size == 2 and args.num_layers > 0
    exported = sum(f.stat().st_size for f in export.glob("*.safetensors"))
    assert len(list(export.glob("*.safetensors"))) >= 2 and exported >= total, "the export is whole, in shards"
