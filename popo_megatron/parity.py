"""Model-parity check: Megatron-Core (our builder + weight mapping) vs transformers.

`popo parity` runs it at several TP/PP/SP layouts on local processes and
prints a table; it is the main demo until the trainer lands.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from popo_megatron.launch import run_local

LAYOUTS: dict[str, dict] = {
    "tp1": dict(tp=1, pp=1, sp=False),
    "tp2": dict(tp=2, pp=1, sp=False),
    "tp2_sp": dict(tp=2, pp=1, sp=True),
    "pp2": dict(tp=1, pp=2, sp=False),
    "tp2_pp2": dict(tp=2, pp=2, sp=False),
}


def _parity_worker(hf_path: str, tp: int, pp: int, sp: bool, result_file: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from popo_megatron.config import load_config, validate_config
    from popo_megatron.convert import load_hf_model
    from popo_megatron.model.forward import forward_backward
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.platform import init_model_parallel, seed_everything

    cfg = load_config(
        overrides=[
            f"model.hf_path={hf_path}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.sequence_parallel={sp}",
        ]
    )
    validate_config(cfg, dist.get_world_size(), read_hf_config(hf_path))
    init_model_parallel(cfg.parallel)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    model, args = load_hf_model(cfg)
    load_s = time.perf_counter() - start
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = forward_backward(model, tokens)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        reference = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
        with torch.no_grad():
            ref = reference(tokens).logits
        diff = (logits[0][..., : args.vocab_size] - ref).abs().max().item()
        Path(result_file).write_text(json.dumps(dict(max_abs_diff=diff, load_s=load_s)))


def run_parity(hf_path: str | Path, layouts: list[str]) -> list[dict]:
    """Run the parity check at each layout (each in a fresh local world); one result dict per layout."""
    results = []
    for name in layouts:
        spec = LAYOUTS[name]
        world = spec["tp"] * spec["pp"]
        with tempfile.TemporaryDirectory() as tmp:
            result_file = str(Path(tmp) / "result.json")
            start = time.perf_counter()
            run_local(_parity_worker, world, str(hf_path), spec["tp"], spec["pp"], spec["sp"], result_file)
            result = json.loads(Path(result_file).read_text())
        results.append(dict(layout=name, world=world, wall_s=time.perf_counter() - start, **result))
        print(f"  {name:8s} max |logits - transformers| = {result['max_abs_diff']:.2e}", flush=True)
    return results
