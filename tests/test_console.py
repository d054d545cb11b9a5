"""What a user reads: `popo train` puts our lines on the console (progress bar, step lines, held-out
results, the summary) and everything else, vLLM's and megatron-core's included, in OUTPUT_DIR/logs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_cpu.yaml"
SMALL = [
    "train.prompts_per_step=8",
    "rollout.n=4",
    "train.micro_batch_size=8",
    "reward.workers=1",
    "train.checkpoint_every=0",
    "eval.every=0",
]
# What library output looks like: log levels, warning classes, the libraries' names, native runtimes.
LIBRARY_LINE = re.compile(
    r"\b(INFO|WARNING|DEBUG)\b|Warning\b|Traceback|vllm|megatron|EngineCore|tcmalloc|iomp|NUMA|oneDNN|gloo",
    re.IGNORECASE,
)


def _train(out: Path, model: Path, *overrides: str, verbose: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "popo_megatron", *(["--verbose"] if verbose else []), "train", str(EXAMPLE)]
    command += [f"model.hf_path={model}", f"train.output_dir={out}", *SMALL, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Every line the user saw, progress-bar redraws split apart."""
    return [line.strip() for line in re.split(r"[\r\n]", proc.stdout + proc.stderr) if line.strip()]


def test_the_console_carries_our_lines_and_the_log_file_everything(arith_model, tmp_path):
    out = tmp_path / "run"
    proc = _train(out, arith_model, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _console_lines(proc)
    assert any(line.startswith("step 2/2 |") for line in lines) and any("mean reward" in line for line in lines)
    assert any(line.startswith("held-out after step 2") for line in lines)
    library = [line for line in lines if LIBRARY_LINE.search(line)]
    assert not library, "library output on the console:\n" + "\n".join(library[:20])
    log = (out / "logs" / "rank_0.log").read_text(errors="replace")
    assert re.search(r"INFO vllm", log), "vLLM's records are in the rank's log"
    assert "Failed to load weights" in log, "a filtered message is kept in the log, only off the console"
    assert "step 2/2 |" in log, "our lines are in the log too"


def test_verbose_puts_everything_on_the_console(arith_model, tmp_path):
    proc = _train(tmp_path / "run", arith_model, "train.steps=1", verbose=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(re.search(r"INFO.*vllm|vllm.*INFO", line) for line in _console_lines(proc))


def test_a_vllm_error_reaches_the_console(arith_model, tmp_path):
    # A context longer than the model's: vLLM itself refuses to start.
    proc = _train(tmp_path / "run", arith_model, "train.steps=1", "rollout.max_model_len=100000")
    assert proc.returncode != 0
    assert "max_model_len (100000)" in proc.stderr, proc.stderr[-3000:]


def test_prompts_longer_than_the_engines_context_stop_the_run_before_it_starts(arith_model, tmp_path):
    # Every prompt of the task is longer than 4 tokens: vLLM would refuse each batch mid-run.
    proc = _train(tmp_path / "run", arith_model, "train.steps=1", "rollout.max_model_len=4")
    assert proc.returncode != 0
    assert "have a prompt of at least the engine's context (4 tokens" in proc.stderr, proc.stderr[-3000:]
    assert "none is left: raise rollout.max_model_len" in proc.stderr
    assert "Traceback" not in proc.stderr
