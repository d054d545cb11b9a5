#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine (Python 3.12, no network) that fits one command of the
# device tool: everything, the report and the archive included, ends within POPO_DEVICE_BUDGET_S (540 s).
#
#   scripts/device_check.sh OUT_DIR          # on the GPU machine, after scripts/device_wheels.sh here
#   scripts/device_check.sh --dry OUT_DIR    # anywhere (CI): this project's .venv, the CUDA-only tests skipped
#
# POPO_DEVICE_PYTHON picks another interpreter than python3 (e.g. a Python 3.12 venv with torch on a machine
# without a GPU: the same run then checks megatron-core 0.19 on its CPUs, the gpu tests skipped).
#
# The parts run most important first, each under min(its cap, what is left of the budget less the report's
# reserve); a part that runs out of time is interrupted (SIGINT: pytest still writes what ran) and reported
# as timed out, and the parts after it run in what is left or are reported as not run:
#   install   the carried wheels (.device_wheels/, or $POPO_DEVICE_WHEELS) into a scratch directory on
#             PYTHONPATH next to the repository (nothing is installed into the machine's Python);
#   versions  Python, torch, CUDA, the GPU, megatron-core, transformers;
#   gpu       the tests marked `gpu` (tests/test_gpu.py) on CUDA;
#   gpu_step  bench/bench_gpu_step.py: training throughput and MFU of a Qwen2.5-0.5B-shaped model in bf16;
#             the twin's EMA and swap against a device copy (a tiny shape without CUDA);
#   cpu       the megatron-dependent CPU tests with the GPU hidden: on the GPU machine the only place where
#             megatron-core 0.19 meets Python 3.12 and our code (in --dry mode only collected: the CPU
#             suite runs them).
# It writes one file, OUT_DIR/device_check.tar.gz (device_check.md and .json: every part and test with its
# outcome; the logs), and prints the report. Exit status 0 when nothing failed or timed out.
set -uo pipefail

BUDGET_S="${POPO_DEVICE_BUDGET_S:-540}"
REPORT_S=15 # the report and the archive
KILL_S=10   # after SIGINT, before SIGKILL
# part:cap in seconds, in the order they run
PARTS=(install:60 versions:30 gpu:200 gpu_step:120 cpu:300)

dry=0
if [[ "${1:-}" == "--dry" ]]; then
  dry=1
  shift
fi
out="${1:?usage: scripts/device_check.sh [--dry] OUT_DIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)/device_check"
mkdir -p "$work"
cd "$root" || exit 2
export PYTHONUNBUFFERED=1

# The megatron-dependent tests that need neither vLLM nor Transformer Engine (the GPU machine has neither),
# the ones that say most first.
CPU_TESTS=(
  tests/test_cpu_compat.py
  tests/test_optimizer_state.py
  tests/test_model_parity.py
  tests/test_popo_step.py
  tests/test_twin.py
  tests/test_logprobs.py
  tests/test_convert.py
  tests/test_convert_errors.py
  tests/test_hf_loading.py
  tests/test_mapping.py
  tests/test_builder.py
)

cap_of() { # the cap PARTS gives part $1
  local entry
  for entry in "${PARTS[@]}"; do [[ "${entry%%:*}" == "$1" ]] && echo "${entry#*:}"; done
}

# run_part NAME COMMAND...: runs COMMAND (its output in NAME.log) under the part's share of the budget and
# appends "NAME rc seconds limit" to parts.tsv (rc 124: interrupted at the limit; -1: no time left to start).
run_part() {
  local name="$1" limit left start rc
  shift
  left=$((BUDGET_S - REPORT_S - KILL_S - SECONDS))
  limit="$(cap_of "$name")"
  ((left < limit)) && limit="$left"
  if ((limit < 5)); then
    printf '%s -1 0 %s\n' "$name" "$limit" >>"$work/parts.tsv"
    echo "device_check: $name not run (the budget is spent)"
    return 1
  fi
  start=$SECONDS
  timeout -s INT -k "$KILL_S" "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  ((rc == 130 || rc == 137)) && rc=124 # interrupted, or killed after it
  printf '%s %s %s %s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$work/parts.tsv"
  echo "device_check: $name rc=$rc in $((SECONDS - start)) s (limit $limit s)"
  return "$rc"
}

status=0
if [[ "$dry" == 1 ]]; then
  python="$root/.venv/bin/python"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  collect=(--collect-only -q) # prints the test ids
else
  python="${POPO_DEVICE_PYTHON:-$(command -v python3)}"
  wheels="${POPO_DEVICE_WHEELS:-$root/.device_wheels}"
  site="$(dirname "$work")/site"
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "device_check: no wheels in $wheels (run scripts/device_wheels.sh on a machine with a network)" >&2
    exit 2
  fi
  run_part install "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl \
    || { echo "device_check: installing the wheels failed:" >&2; tail -5 "$work/install.log" >&2; exit 2; }
  export PYTHONPATH="$site:$root"
  collect=(-v) # a line per test as it ends: what ran is known even if the part is interrupted
fi

run_part versions "$python" scripts/device_versions.py "$work/versions.json" || status=1
run_part gpu "$python" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider --junitxml="$work/gpu.xml" \
  || status=1
tiny=()
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || tiny=(--tiny)
run_part gpu_step "$python" bench/bench_gpu_step.py "${tiny[@]}" --out "$work" || status=1
# our platform layer picks gloo and the CPU when CUDA is absent
CUDA_VISIBLE_DEVICES="" run_part cpu "$python" -m pytest "${CPU_TESTS[@]}" -m "not gpu" -p no:cacheprovider \
  "${collect[@]}" --junitxml="$work/cpu.xml" || status=1

"$python" scripts/device_report.py "$work" "$dry" || status=1
tar -czf "$out/device_check.tar.gz" -C "$(dirname "$work")" device_check
cat "$work/device_check.md"
echo "device_check: $out/device_check.tar.gz in $SECONDS s of $BUDGET_S"
exit "$status"
