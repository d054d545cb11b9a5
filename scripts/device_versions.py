"""Write the versions the device check ran with (Python, torch, CUDA, the GPU, key packages) to argv[1]."""

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
with open(sys.argv[1], "w") as f:
    json.dump(versions, f, indent=1)
print(" ".join(f"{k}={v}" for k, v in versions.items()))
