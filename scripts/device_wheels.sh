#!/usr/bin/env bash
# The wheels the GPU check machine lacks, downloaded here (it has no network; they travel with the code).
#
#   scripts/device_wheels.sh [DIR]        # default DIR: .device_wheels (git-ignored)
#
# That machine runs Python 3.12 on x86-64 with torch (CUDA), transformers, numpy, sympy, PyYAML, psutil,
# pytest, tensorboard and matplotlib already installed; it lacks megatron-core and the pure-Python packages
# below that popo_megatron imports. Transformer Engine and CUDA vLLM are far over the size limit of what
# travels (64 MiB with the repository) and are not carried: scripts/device_check.sh runs without them.
# Prints the wheels and their total size.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/.device_wheels}"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"

# Pinned: what the check is run with is what its results say.
WHEELS=(
  "megatron-core==0.19.2"          # the GPU clusters' line (cp312 manylinux wheel)
  "omegaconf==2.4.0"
  "antlr4-python3-runtime==4.13.2" # omegaconf's and math-verify's parser runtime
  "math-verify==0.9.0"
  "latex2sympy2_extended==1.11.0"
)

mkdir -p "$out"
rm -f "$out"/*.whl
"$python" -m pip download --quiet --dest "$out" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
if [[ "$count" -ne "${#WHEELS[@]}" ]]; then
  echo "device_wheels: expected ${#WHEELS[@]} wheels in $out, found $count" >&2
  exit 1
fi
find "$out" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -k2 | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
awk -v b="$total" 'BEGIN { printf "total: %.2f MiB (the limit for everything that travels is 64 MiB)\n", b / 1048576 }'
