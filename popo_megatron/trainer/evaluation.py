"""`popo eval`: a checkpoint's avg@k and pass@k on benchmarks, with the settings it was trained with
(the rollout's sampling, at `eval.temperature` when the run set one).

The config starts from the training run's own (stored in a training
checkpoint's trainer_state.json), so prompts, sampling and answer extraction
match training; a YAML file and key=value overrides change it. A popo
checkpoint is exported to a temporary HF directory first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from popo_megatron.evaluate import EvalResult, evaluate, hf_model_dir


def _config(checkpoint: Path, config: Path | None, overrides: list[str]):
    import tempfile

    from popo_megatron.checkpoint.runs import TRAINER_STATE
    from popo_megatron.config import load_config

    stored = checkpoint / TRAINER_STATE
    overrides = [f"model.hf_path={checkpoint}", *overrides]
    if config is None and stored.is_file():  # the run's own config, through the same loader as a YAML file
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / f"{checkpoint.name}_{TRAINER_STATE}.yaml"
            config.write_text(OmegaConf.to_yaml(json.loads(stored.read_text())["config"]))
            return load_config(config, overrides)
    return load_config(config, overrides)


def evaluate_checkpoint(
    checkpoint: Path,
    benchmarks: list[str] | None,
    k: int,
    out: Path,
    config: Path | None = None,
    overrides: list[str] = (),
    weights: str = "model",
) -> list[tuple[EvalResult, Path]]:
    """Evaluate one checkpoint on each benchmark (one process, one engine); JSON per benchmark under `out`."""
    from transformers import AutoTokenizer

    from popo_megatron.checkpoint.runs import resolve_checkpoint
    from popo_megatron.data.datasets import literal_answers_by_default, load_dataset
    from popo_megatron.data.prompts import engine_context
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.reward.math_verifier import MathVerifier
    from popo_megatron.rollout.engine import SamplingSettings
    from popo_megatron.rollout.vllm_engine import vllm_engine

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = _config(checkpoint, config, list(overrides))
    results = []
    with hf_model_dir(checkpoint, weights) as model_dir:
        engine = vllm_engine(cfg, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        context = engine_context(cfg.rollout, read_hf_config(model_dir).max_position_embeddings)
    verifier = MathVerifier(cfg.reward, literal_answers_by_default(cfg.data))
    try:
        for name in benchmarks or ["math500"]:
            problems = load_dataset(cfg.data, name)
            sampling = SamplingSettings.from_config(cfg.rollout)
            if cfg.eval.temperature is not None:  # the run's evaluation temperature, as during training
                sampling = replace(sampling, temperature=cfg.eval.temperature)
            result = evaluate(
                engine, problems, tokenizer, verifier, cfg.data, sampling, k, seed=cfg.seed, context=context
            )
            results.append((result, result.write(Path(out) / f"{Path(name).stem}.json")))
    finally:
        verifier.close()
        engine.shutdown()
    return results
