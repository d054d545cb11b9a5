"""`popo convert hf-to-mcore` streams: its peak memory stays far below the checkpoint's size."""

from __future__ import annotations

import subprocess
import sys

from synthetic_checkpoint import save_synthetic_hf_checkpoint

from popo_megatron.checkpoint.format import read_checkpoint

CHECKPOINT_GB = 2.1
# The process imports torch (~0.3 GiB) and holds a few tensors of at most 131 MB
# (the embedding; measured peak ~0.7 GiB); the checkpoint is 2.0 GiB, and
# loading it whole would need more than that.
PEAK_RSS_BOUND_MIB = 900

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


def test_hf_to_mcore_peak_memory_is_bounded(tmp_path):
    hf = tmp_path / "hf"
    total = save_synthetic_hf_checkpoint(hf, CHECKPOINT_GB)
    assert total >= 2e9
    out = tmp_path / "mcore"
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, "convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out), "--tp", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mib = int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0]) / 1024
    print(f"checkpoint {total / 2**20:.0f} MiB, conversion peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < PEAK_RSS_BOUND_MIB, f"peak RSS {peak_mib:.0f} MiB for a {total / 2**20:.0f} MiB checkpoint"
    info, args = read_checkpoint(out)
    assert info.tensor_model_parallel_size == 2 and args.num_layers > 0
