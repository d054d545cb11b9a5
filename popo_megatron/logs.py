"""The console and the log files: what a user reads, and where everything else goes.

Every process of a command calls `setup_logging` first, before vLLM or megatron-core is imported:

- The console of rank 0 carries the progress bars, our own records (the `popo` loggers: step lines,
  held-out results, the summary, warnings a user must act on), and warnings and errors of the libraries
  except the known-harmless ones below. Other ranks' consoles carry errors only.
- With a log directory, everything the process writes goes to LOG_DIR/rank_N.log in full: every record
  of every logger at INFO and above, Python warnings, and what native code writes straight to file
  descriptors 1 and 2 (OpenMP, oneDNN, tcmalloc, gloo): the descriptors themselves are redirected there,
  and the console keeps a duplicate of the original standard error.
- `popo --verbose` (or POPO_VERBOSE=1, which the ranks inherit) leaves the console as the libraries
  configure it: everything shows, nothing is redirected.

vLLM configures its own logger to print to stdout at import unless VLLM_CONFIGURE_LOGGING=0, which is
why this must come first; its records then reach the handlers here like everyone else's.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

VERBOSE_ENV = "POPO_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Library messages kept off the console (they stay in the log file): (logger name prefix, message
# pattern, why it is harmless). Each was seen in a normal run.
HARMLESS = [
    (
        "vllm",
        r"RotaryEmbedding: Failed to load weights",
        "after every weight sync: the rotary cos/sin cache is computed from the config, not loaded, and "
        "vLLM keeps the one it has",
    ),
    (
        "vllm",
        r"Chat template warmup failed",
        "at engine start: the engine runs without a tokenizer (token ids in and out); prompts are rendered "
        "by the trainer's tokenizer, so vLLM's chat template is never used",
    ),
    (
        "vllm",
        r"global random seed is set to",
        "at engine start, in-process vLLM seeds the process's random generators; the engine restores them "
        "(rollout/vllm_engine.py) and sampling uses explicit per-request seeds",
    ),
    (
        "vllm",
        r"Enforce eager set|Inductor compilation was disabled",
        "we ask for eager mode (no torch.compile or graphs) on purpose: in-process weight reloads every step",
    ),
    (
        "vllm",
        r"Triton is not installed|Model Runner V2 requires Triton",
        "the CPU build's optional kernels; vLLM falls back to the V1 model runner, which is what we test",
    ),
    (
        "vllm",
        r"Reset SSM cache type",
        "about Mamba-style state caches, which attention-only models do not have",
    ),
    (
        "vllm",
        r"doesn't allow to use `torch.set_num_threads` after the thread binding",
        "vLLM's CPU worker has pinned the process's OpenMP threads to cores; later requests to change the "
        "thread count are skipped and the pinning stays",
    ),
    (
        "vllm",
        r"Using None for EOS token id because tokenizer is not initialized",
        "the engine runs without a tokenizer; the trainer passes the model's EOS ids as stop tokens",
    ),
    (
        "vllm",
        r"OMP_NUM_THREADS=\d+ is set; leaving Torch threads at",
        "a caution about several threads on CPU; each local rank gets its share of the cores on purpose "
        "(launch.rank_threads): measured on 2 cores, one rank samples 1.74x faster with 2 threads than with 1",
    ),
    (
        "vllm",
        r"lib(tcmalloc|iomp) is not found in LD_PRELOAD",
        "a performance hint for vLLM's CPU build: the allocator and OpenMP runtime it prefers; runs are "
        "correct without them",
    ),
]
_HARMLESS = [(name, re.compile(pattern)) for name, pattern, _ in HARMLESS]

_configured = False
_console: IO[str] | None = None  # set when the descriptors are redirected: the original stderr
_console_out: IO[str] | None = None  # and stdout
_log_file: Path | None = None


def console() -> IO[str]:
    """The stream the user reads: standard error as it was before `setup_logging` redirected it."""
    return _console or sys.stderr


def console_out() -> IO[str]:
    """Standard output as it was before `setup_logging` redirected it: for a command's results."""
    return _console_out or sys.stdout


def log_file() -> Path | None:
    """This process's log file (None: its output goes to the console)."""
    return _log_file


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def get_logger(name: str) -> logging.Logger:
    """A logger of this package (`popo.<name>`): its INFO records reach rank 0's console."""
    return logging.getLogger(f"popo.{name}")


def progress(*args: Any, rank: int = 0, **kwargs: Any) -> tqdm:
    """A tqdm bar on the console, drawn by rank 0 only (the others would draw over it). Also vLLM's
    `use_tqdm` factory."""
    kwargs["disable"] = kwargs.get("disable", False) or rank != 0
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, file=console(), **kwargs)


class _ConsoleHandler(logging.Handler):
    """Writes above a progress bar instead of through it."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "popo" or record.name.startswith("popo."):
            return record.levelno >= (logging.INFO if self.rank == 0 else logging.ERROR)
        if record.levelno < (logging.WARNING if self.rank == 0 else logging.ERROR):
            return False
        if record.name == "py.warnings":  # Python warnings of libraries: deprecations, hints; the log file
            return False
        message = record.getMessage()
        return not any(record.name.startswith(name) and pattern.search(message) for name, pattern in _HARMLESS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:  # ours: "warning: ..."; a library's: "warning (vllm.x): ..."
                ours = record.name == "popo" or record.name.startswith("popo.")
                text = f"{record.levelname.lower()}{'' if ours else f' ({record.name})'}: {text}"
            tqdm.write(text, file=console())
        except Exception:  # noqa: BLE001 - logging must not raise; the standard way to report it
            self.handleError(record)


def setup_logging(log_dir: str | Path | None, rank: int = 0) -> Path | None:
    """Route this process's output (see the module docstring); returns its log file, if any. Call it once
    per process, first; later calls change nothing."""
    global _configured, _console, _console_out, _log_file
    if _configured:
        return _log_file
    _configured = True
    if is_verbose():
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        return None
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    # transformers' own bars ("Writing model shards" for a millisecond when the tiny model is made, "Loading
    # checkpoint shards"): ours say what is happening; read at transformers' import, hence here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    if log_dir is not None:
        _log_file = Path(log_dir) / f"rank_{rank}.log"
        _log_file.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        _console = os.fdopen(os.dup(2), "w", buffering=1)
        _console_out = os.fdopen(os.dup(1), "w", buffering=1)
        fd = os.open(_log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        to_file = logging.StreamHandler(sys.stderr)  # fd 2: the log file now
        to_file.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(to_file)
    root.addHandler(_ConsoleHandler(rank))
    return _log_file
