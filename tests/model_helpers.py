"""Helpers for tests that build a Megatron model inside a local world (see popo_megatron.launch)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Change every weight by an elementwise function of its value, so that copies of a
    weight (TP-replicated norms, the tied output layer on the last stage) stay equal,
    as they do after a real optimiser step."""
    for param in model.parameters():
        param.add_(scale * torch.sin(param * 997.0))


def config_for(hf: Path, tp: int, pp: int, sequence_parallel: bool = False, overrides: tuple[str, ...] = ()):
    from popo_megatron.config import load_config

    return load_config(
        overrides=[
            f"model.hf_path={hf}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.sequence_parallel={sequence_parallel}",
            *overrides,
        ]
    )


def build_model(hf: Path, tp: int, pp: int, sequence_parallel: bool = False, overrides: tuple[str, ...] = ()):
    """This rank's model stage at the layout (uninitialised weights), its HF args and config."""
    from popo_megatron.model.builder import build_gpt_model
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.platform import init_model_parallel, seed_everything

    cfg = config_for(hf, tp, pp, sequence_parallel, overrides)
    init_model_parallel(cfg.parallel)
    seed_everything(0)
    args = read_hf_config(hf)
    return build_gpt_model(args, cfg), args, cfg
