"""What a run shows and keeps: a log line and a progress bar per step, metrics.jsonl, TensorBoard, a curve.

Only global rank 0 writes; the step's metrics reach it already reduced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig

from popo_megatron.checkpoint.durable import write_text_durably
from popo_megatron.logs import get_logger, progress
from popo_megatron.metrics import METRICS, STEP_VALUES, Reduce
from popo_megatron.trainer.watch import RunWatch

log = get_logger("trainer")


def step_record(step: int, metrics: dict[str, float], values: dict[str, float], algorithm: str) -> dict:
    """The metrics.jsonl object of a step: its columns (popo_megatron.metrics, NaN where not measured: the
    other algorithm's, a loss without an update), the recipe's values of the step, then everything measured."""
    record = {"step": step}
    for metric in METRICS.values():
        if metric.jsonl is not None and metric.reduce != Reduce.none:
            if algorithm in metric.algorithms or metric.jsonl not in record:
                record[metric.jsonl] = metrics.get(metric.name, float("nan"))
    record.update(values)
    for column in STEP_VALUES:  # another objective's values (GRPO has no EMA target)
        record.setdefault(column, float("nan"))
    record["all"] = metrics
    return record


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def log_line(record: dict, total: int) -> str:
    return (
        f"step {record['step']}/{total} | reward {_fmt(record['reward_mean'])} "
        f"pos {_fmt(record['positive_frac'])} no-pos {record['groups_without_positive']:.0f} | "
        f"loss {_fmt(record['loss'], 4)} drift {_fmt(record['drift'], 4)} m {_fmt(record['twin_momentum'], 4)} | "
        f"clip {_fmt(record['clip_frac'])} ent {_fmt(record['entropy'])} len {_fmt(record['response_len_mean'], 1)} | "
        f"{record['time_step_s']:.1f}s (rollout {record['time_rollout_s']:.1f} reward {record['time_reward_s']:.1f} "
        f"train {record['time_train_s']:.1f} sync {record['time_sync_s']:.1f}) {record['tokens_per_s']:.0f} tok/s"
    )


def drop_torn_tail(path: Path, block: int = 1 << 16) -> None:
    """Cut a JSON-lines file back to its last complete line: a run killed while writing a record (kill -9,
    a node lost) leaves a torn one, which the next record would be appended to. The step it described is
    after the last checkpoint, so the resumed run writes it again. Reads only the tail."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


class Logbook:
    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int, enabled: bool, entropy_floor: float = 0.0
    ) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.dir = Path(output_dir)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", EVAL_JSONL):
            drop_torn_tail(self.dir / name)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step")
        self.watch = RunWatch(entropy_floor)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for name, value in record["all"].items():
            self.tensorboard.add_scalar(name, value, step)
        for column, metric in STEP_VALUES.items():
            self.tensorboard.add_scalar(metric.name, record[column], step)
        log.info(log_line(record, self.total))
        for warning in self.watch.step(record):
            log.warning(warning)
        self.bar.update(1)

    def record_heldout(self, result) -> None:
        """A held-out evaluation (trainer.heldout.HeldoutResult): eval.jsonl, TensorBoard eval/*, a log line."""
        if not self.enabled:
            return
        with open(self.dir / EVAL_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(result.record()) + "\n")
        for name in ("avg_at_k", "pass_at_k", "prompt_blind"):
            self.tensorboard.add_scalar(f"eval/{name}", getattr(result, name), result.step)
        log.info(result.line())
        warning = self.watch.heldout(result.step, result.avg_at_k)
        if warning is not None:
            log.warning(warning)

    def close(self) -> Path | None:
        """Flush everything and draw the reward curve of the whole run (metrics.jsonl, resumed runs too)."""
        if not self.enabled:
            return None
        self.bar.close()
        self.jsonl.close()
        self.tensorboard.close()
        return plot_learning_curve(self.dir / "metrics.jsonl", self.dir / "learning_curve.png")


# OUTPUT_DIR/EVAL_JSONL: one line per held-out evaluation (trainer.heldout.HeldoutResult).
EVAL_JSONL = "eval.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The last record of each step (a resumed run may have rewritten some steps); [] when there is no file."""
    by_step = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """The mean of each value and the (up to) window - 1 before it."""
    out = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1) : i + 1]
        out.append(sum(recent) / len(recent))
    return out


def plot_learning_curve(metrics_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rewards = [r["reward_mean"] for r in records]
    ax.plot(steps, rewards, marker="o", markersize=2, alpha=0.4, label="train reward of the step")
    ax.plot(steps, moving_average(rewards), linewidth=2, label="train reward, 10-step moving average")
    heldout = read_metrics(metrics_path.parent / EVAL_JSONL)
    if heldout:
        k = f"{heldout[-1]['k']}, T={heldout[-1]['temperature']:g}"
        ax.plot(
            [h["step"] for h in heldout],
            [h["avg_at_k"] for h in heldout],
            marker="s",
            linewidth=2,
            color="black",
            label=f"held-out avg@{k}",
        )
        ax.axhline(
            heldout[-1]["prompt_blind"], color="gray", linestyle="--", label="held-out, best prompt-blind answer"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# OUTPUT_DIR/RUN_STATE, written at the end of every run: whether it finished or stopped early (and why),
# so a job script knows whether to requeue itself.
RUN_STATE = "run_state.json"


def clear_run_state(output_dir: Path) -> None:
    """At the start of a run: a crash then leaves no run_state.json, never a stale one that says "requeue"."""
    (output_dir / RUN_STATE).unlink(missing_ok=True)


def write_run_state(output_dir: Path, step: int, steps: int, stopped_by: str | None) -> None:
    state = {"step": step, "steps": steps, "complete": step >= steps, "stopped_by": stopped_by}
    # Durably, in json.dumps's spacing: slurm/train.sbatch greps it to decide whether to requeue.
    write_text_durably(output_dir / RUN_STATE, json.dumps(state) + "\n")


def _run_state_line(output_dir: Path) -> str:
    path = output_dir / RUN_STATE
    if not path.is_file():
        return "unknown (no run_state.json)"
    state = json.loads(path.read_text())
    if state["complete"]:
        return f"complete ({state['step']}/{state['steps']} steps)"
    why = {"signal": "a signal", "time": "train.max_wall_time_s"}.get(state["stopped_by"], state["stopped_by"])
    return f"stopped by {why} after step {state['step']}/{state['steps']}: the same command resumes it"


def _heldout_rows(heldout: list[dict]) -> list[tuple[str, str]]:
    if not heldout:
        return []
    start, end = heldout[0], heldout[-1]
    k = f"{end['k']} (T={end['temperature']:g})"
    return [
        (f"held-out avg@{k}, step {start['step']}", f"{start['avg_at_k']:.3f}"),
        (f"held-out avg@{k}, step {end['step']}", f"{end['avg_at_k']:.3f}  ({end['problems']} problems)"),
        ("held-out, best prompt-blind answer", f"{end['prompt_blind']:.3f}"),
    ]


def print_summary(cfg: DictConfig) -> None:
    """A short table of the run from its metrics.jsonl (all steps, resumed runs included)."""
    out = Path(cfg.train.output_dir)
    if not (out / "metrics.jsonl").is_file():
        return
    records = read_metrics(out / "metrics.jsonl")
    if not records:
        return
    first, last = records[0], records[-1]
    window = records[-min(5, len(records)) :]
    rows = [
        ("run", _run_state_line(out)),
        ("steps", f"{last['step']}"),
        ("mean reward, first step", f"{first['reward_mean']:.3f}"),
        (f"mean reward, last {len(window)} steps", f"{sum(r['reward_mean'] for r in window) / len(window):.3f}"),
        ("best step reward", f"{max(r['reward_mean'] for r in records):.3f}"),
        *_heldout_rows(read_metrics(out / EVAL_JSONL)),
        ("metrics", str(out / "metrics.jsonl")),
        ("learning curve", str(out / "learning_curve.png")),
        ("checkpoints", str(out / "checkpoints")),
    ]
    width = max(len(k) for k, _ in rows)
    log.info("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
