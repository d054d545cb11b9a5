#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine (Python 3.12, no network), under 8 minutes.
#
#   scripts/device_check.sh OUT_DIR          # on the GPU machine, after scripts/device_wheels.sh here
#   scripts/device_check.sh --dry OUT_DIR    # anywhere (CI): this project's .venv, the CUDA-only tests skipped
#
# POPO_DEVICE_PYTHON picks another interpreter than python3 (e.g. a Python 3.12 venv with torch on a machine
# without a GPU: the same run then checks megatron-core 0.19 on its CPUs, the gpu tests skipped).
#
# 1. installs the carried wheels (.device_wheels/, or $POPO_DEVICE_WHEELS) into a scratch directory on
#    PYTHONPATH, next to the repository itself (nothing is installed into the machine's Python);
# 2. records the versions (Python, torch, CUDA, the GPU, megatron-core, transformers);
# 3. runs the tests marked `gpu` (tests/test_gpu.py) on CUDA, and bench/bench_gpu_step.py (training
#    throughput and MFU of a Qwen2.5-0.5B-shaped model in bf16; the twin's EMA and swap against a copy);
# 4. runs the megatron-dependent CPU tests with the GPU hidden: on the GPU machine the only place where
#    megatron-core 0.19 meets Python 3.12 and our code (in --dry mode they are only collected: the CPU
#    suite runs them);
# 5. writes OUT_DIR/device_check.json and OUT_DIR/device_check.md (a table of every test and its outcome)
#    and the logs of each part. Exit status 0 when nothing failed.
set -uo pipefail

dry=0
if [[ "${1:-}" == "--dry" ]]; then
  dry=1
  shift
fi
out="${1:?usage: scripts/device_check.sh [--dry] OUT_DIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root" || exit 2

# The megatron-dependent tests that need neither vLLM nor Transformer Engine (the GPU machine has neither).
CPU_TESTS=(
  tests/test_model_parity.py
  tests/test_popo_step.py
  tests/test_twin.py
  tests/test_cpu_compat.py
  tests/test_optimizer_state.py
  tests/test_logprobs.py
  tests/test_convert.py
  tests/test_convert_errors.py
  tests/test_hf_loading.py
  tests/test_mapping.py
  tests/test_builder.py
)

if [[ "$dry" == 1 ]]; then
  python="$root/.venv/bin/python"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  collect=(--collect-only -q)
else
  python="${POPO_DEVICE_PYTHON:-$(command -v python3)}"
  wheels="${POPO_DEVICE_WHEELS:-$root/.device_wheels}"
  site="$(mktemp -d)/site"
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "device_check: no wheels in $wheels (run scripts/device_wheels.sh on a machine with a network)" >&2
    exit 2
  fi
  "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl >"$out/install.log" 2>&1 \
    || { echo "device_check: installing the wheels failed (see $out/install.log)" >&2; exit 2; }
  export PYTHONPATH="$site:$root"
  collect=()
fi
export PYTHONUNBUFFERED=1

"$python" - "$out/versions.json" <<'PY'
import importlib.metadata as md
import json
import platform
import sys

import torch

versions = dict(
    python=platform.python_version(),
    torch=torch.__version__,
    cuda=torch.version.cuda,
    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
)
for package in ("megatron-core", "transformers", "omegaconf", "math-verify"):
    try:
        versions[package] = md.version(package)
    except md.PackageNotFoundError:
        versions[package] = None
json.dump(versions, open(sys.argv[1], "w"), indent=1)
print(" ".join(f"{k}={v}" for k, v in versions.items()))
PY

status=0
# 3. on CUDA (skipped without it)
timeout 300 "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$out/gpu.xml" \
  >"$out/gpu.log" 2>&1 || status=1
tail -3 "$out/gpu.log"
# 3b. throughput and MFU of a 0.5B model, the twin's EMA and swap against a device copy (a tiny shape without CUDA)
tiny=()
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || tiny=(--tiny)
timeout 240 "$python" bench/bench_gpu_step.py "${tiny[@]}" --out "$out" >"$out/gpu_step.log" 2>&1 || status=1
grep -E "tokens/s|twin" "$out/gpu_step.log"
# 4. on the CPUs, the GPU hidden (our platform layer picks gloo and the CPU when CUDA is absent)
CUDA_VISIBLE_DEVICES="" timeout 600 "$python" -m pytest "${CPU_TESTS[@]}" -m "not gpu" -p no:cacheprovider \
  "${collect[@]}" --junitxml="$out/cpu.xml" >"$out/cpu.log" 2>&1 || status=1
tail -3 "$out/cpu.log"

"$python" - "$out" "$dry" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
rows = []
for part in ("gpu", "cpu"):
    path = out / f"{part}.xml"
    if dry and part == "cpu":  # collected only: the test ids pytest -q listed
        for line in (out / "cpu.log").read_text().splitlines():
            if "::" in line:
                rows.append(dict(part=part, test=line.strip(), outcome="collected", seconds=0.0, message=""))
        continue
    if not path.exists():
        rows.append(dict(part=part, test="(no report)", outcome="error", seconds=0.0, message=""))
        continue
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (found.get("message") or "")[:200]
        rows.append(
            dict(part=part, test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                 seconds=float(case.get("time") or 0), message=message)
        )
versions = json.loads((out / "versions.json").read_text())
step_file = out / "gpu_step.json"
step = json.loads(step_file.read_text()) if step_file.exists() else None
result = dict(dry=dry, versions=versions, gpu_step=step, tests=rows)
(out / "device_check.json").write_text(json.dumps(result, indent=1) + "\n")
lines = [
    f"# Device check{' (dry: CUDA tests skipped, CPU tests collected only)' if dry else ''}",
    "",
    " | ".join(f"{k} {v}" for k, v in versions.items()),
    "",
    (
        f"Training ({step['device']}, {step['params'] / 1e6:.0f}M parameters, sequence {step['seq']}): "
        f"{step['train_tokens_per_s']:,.0f} tokens/s, MFU {100 * step['mfu']:.1f}%. Twin EMA "
        f"{step['ema_gb_s']:.1f} GB/s, swap {step['swap_gb_s']:.1f} GB/s, device copy {step['copy_gb_s']:.1f} GB/s."
        if step
        else "bench/bench_gpu_step.py wrote no result (see gpu_step.log)."
    ),
    "",
    "| part | test | outcome | s | message |",
    "| --- | --- | --- | --- | --- |",
]
lines += [f"| {r['part']} | {r['test']} | {r['outcome']} | {r['seconds']:.1f} | {r['message']} |" for r in rows]
(out / "device_check.md").write_text("\n".join(lines) + "\n")
counts = {}
for r in rows:
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
print("device_check:", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), f"-> {out}/device_check.md")
PY
exit "$status"
