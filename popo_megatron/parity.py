"""Model-parity check: Megatron-Core (our builder + weight mapping) vs transformers.

`popo parity` runs it at several TP/PP/SP layouts on local processes and
prints a table: the check to run after a model or mapping change, before training.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from popo_megatron.errors import UserError
from popo_megatron.launch import run_local
from popo_megatron.logs import get_logger

log = get_logger("parity")


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    sp: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def overrides(self) -> list[str]:
        return [
            f"parallel.tensor_model_parallel_size={self.tp}",
            f"parallel.pipeline_model_parallel_size={self.pp}",
            f"parallel.sequence_parallel={self.sp}",
        ]


def parse_layout(name: str) -> Layout:
    """`tpN`, `ppM` and `sp` joined by '_' in any order, each at most once (tp1, tp3_pp2, tp2_sp, pp2, ...)."""
    values: dict = {}
    for part in name.split("_"):
        match = re.fullmatch(r"(tp|pp)([1-9][0-9]*)|sp", part)
        key = part if part == "sp" else match.group(1) if match else None
        if key is None or key in values:
            raise UserError(
                f"layout {name!r}: expected tpN, ppM and sp joined by '_', each at most once (e.g. tp3_pp2, tp2_sp)"
            )
        values[key] = True if key == "sp" else int(match.group(2))
    return Layout(name, **values)


def check_layout(hf_path: str | Path, layout: Layout) -> DictConfig:
    """The config of `hf_path` at `layout`; ConfigError when the model does not allow the layout (heads,
    KV heads, layers vs TP / PP, SP)."""
    from popo_megatron.config import load_config
    from popo_megatron.config.validate import validate_config
    from popo_megatron.model.hf_config import read_hf_config

    cfg = load_config(overrides=[f"model.hf_path={hf_path}", *layout.overrides()])
    validate_config(cfg, layout.world, read_hf_config(hf_path))
    return cfg


def _parity_worker(hf_path: str, layout: Layout, result_file: str) -> None:
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from popo_megatron.model.forward import forward_logits
    from popo_megatron.platform import init_model_parallel, seed_everything
    from popo_megatron.weights import load_hf_model

    cfg = check_layout(hf_path, layout)
    init_model_parallel(cfg.parallel)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    model, args = load_hf_model(cfg)
    load_s = time.perf_counter() - start
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = forward_logits(model, tokens)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        reference = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
        with torch.no_grad():
            ref = reference(tokens).logits
        diff = (logits[0][..., : args.vocab_size].cpu() - ref).abs().max().item()  # the reference runs on CPU
        scale = ref.abs().max().item()
        Path(result_file).write_text(json.dumps(dict(max_abs_diff=diff, max_abs_logit=scale, load_s=load_s)))


# fp32 forwards of the same weights with other kernels and another order of sums: the difference grows
# with the logits' size (a 30-layer real model's reach ~20), so the bound is relative to it.
PARITY_RTOL = 1e-5


def parity_tolerance(result: dict) -> float:
    """The largest |Megatron - transformers| logit difference accepted for a run_parity result."""
    return PARITY_RTOL * max(1.0, result["max_abs_logit"])


def run_parity(hf_path: str | Path, layouts: list[Layout], log_dir: Path | None = None) -> list[dict]:
    """Run the parity check at each layout (each in a fresh local world); one result dict per layout. With
    `log_dir`, the ranks' output goes to LOG_DIR/LAYOUT/rank_N.log."""
    results = []
    for layout in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = str(Path(tmp) / "result.json")
            start = time.perf_counter()
            logs = None if log_dir is None else Path(log_dir) / layout.name
            run_local(_parity_worker, layout.world, str(hf_path), layout, result_file, log_dir=logs)
            result = json.loads(Path(result_file).read_text())
        results.append(dict(layout=layout.name, world=layout.world, wall_s=time.perf_counter() - start, **result))
        log.info(f"  {layout.name:8s} max |logits - transformers| = {result['max_abs_diff']:.2e}")
    return results
