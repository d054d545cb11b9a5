"""What `popo train` does around the training loop: the generated tiny model, and the closing summary."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

# model.hf_path value for the embedded default: a tiny random Qwen2 with the synthetic task's tokenizer,
# generated (seeded by `seed`) under OUTPUT_DIR on first use.
GENERATED_ARITHMETIC = "generate:arithmetic"


def prepare_model(cfg: DictConfig) -> list[str]:
    """Overrides that point model.hf_path at a real directory, creating the generated model if asked for."""
    if cfg.model.hf_path != GENERATED_ARITHMETIC:
        return []
    from popo_megatron.data.synthetic import save_arithmetic_model

    path = Path(cfg.train.output_dir).absolute() / "initial_model"
    if not (path / "config.json").is_file():
        save_arithmetic_model(path, seed=cfg.seed)
    return [f"model.hf_path={path}"]


def print_summary(cfg: DictConfig) -> None:
    """A short table of the run from its metrics.jsonl (all steps, resumed runs included)."""
    from popo_megatron.trainer.logbook import read_metrics

    out = Path(cfg.train.output_dir)
    if not (out / "metrics.jsonl").is_file():
        return
    records = read_metrics(out / "metrics.jsonl")
    if not records:
        return
    first, last = records[0], records[-1]
    window = records[-min(5, len(records)) :]
    rows = [
        ("steps", f"{last['step']}"),
        ("mean reward, first step", f"{first['reward_mean']:.3f}"),
        (f"mean reward, last {len(window)} steps", f"{sum(r['reward_mean'] for r in window) / len(window):.3f}"),
        ("best step reward", f"{max(r['reward_mean'] for r in records):.3f}"),
        ("metrics", str(out / "metrics.jsonl")),
        ("learning curve", str(out / "learning_curve.png")),
        ("checkpoints", str(out / "checkpoints")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
