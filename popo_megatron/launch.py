"""Start a local multi-process world (like torchrun on one machine) from Python.

Used when a command asks for more ranks than it was launched with (e.g.
`popo parity --layouts tp2`, or `popo train` with parallel.tensor_model_parallel_size=2, from a
plain shell) and by the tests.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from popo_megatron.errors import USER_ERROR_EXIT, UserError, record_user_error, recorded_user_error
from popo_megatron.logs import is_verbose, setup_logging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, log_dir: Path | None, errors: str
) -> None:
    if log_dir is not None:  # first: before anything imported can print
        setup_logging(log_dir, rank)
    threads = rank_threads(world_size)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    from popo_megatron.platform import init_distributed, shutdown

    init_distributed(timeout_minutes=10)
    try:
        fn(*args)
    except UserError as exc:  # the parent reports it in one line; the traceback stays in this rank's log
        traceback.print_exc()
        record_user_error(Path(errors), exc)
        sys.exit(USER_ERROR_EXIT)
    # Only after success: shutdown() starts with a barrier, which a failed rank must
    # not enter (its peers may never arrive). A failed rank just exits; the parent
    # then stops the others.
    shutdown()


def rank_threads(world_size: int) -> int:
    """The CPU threads of each of `world_size` local ranks: an equal share of this process's cores. Ranks
    with more threads than their share run many times slower (torchrun sets 1 with several ranks; mp.spawn
    sets nothing); one rank with one thread leaves cores idle (measured on 2 cores: vLLM samples SmolLM2
    1.7x faster with 2 threads than with 1, bench/bench_rollout.py)."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, log_dir: Path | None = None) -> None:
    """Call `fn(*args)` on `world_size` local ranks with torch.distributed initialised; with `log_dir`,
    each rank's output goes to LOG_DIR/rank_N.log (popo_megatron.logs).

    `fn` must be importable (a module-level function). A user error (popo_megatron.errors.UserError) in
    a rank is raised here as a UserError with its message (of the first rank that saw it); any other
    failure of a rank as torch's ProcessRaisedException, with the rank's traceback.
    """
    if not is_verbose():  # when a rank fails, torch warns once per peer it stops; the failure itself is reported
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="popo-errors-") as errors:
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, _free_port(), args, log_dir, errors),
                nprocs=world_size,
                start_method="spawn",
                join=True,
            )
        except ProcessException:
            reported = recorded_user_error(Path(errors))
            if reported is None:
                raise
            raise reported from None
