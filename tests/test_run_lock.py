"""The run directory's lock (trainer/run_lock.py) on real files: who holds it, when it is stale, the
heartbeat. tests/test_faults.py checks two `popo train` jobs on one directory end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from popo_megatron.errors import UserError
from popo_megatron.trainer import run_lock
from popo_megatron.trainer.run_lock import LOCK_FILE, RunLock


def _held_by(tmp_path, **holder) -> None:
    base = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "slurm_restart_count": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps({**base, "started": "then", **holder}))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_by_name(tmp_path):
    _held_by(tmp_path, slurm_job_id="4242")
    with pytest.raises(
        UserError,
        match=rf"in use by another run \(host {socket.gethostname()} PID {os.getpid()}, "
        r"Slurm job 4242, started then, last heartbeat \d+ s ago\).*delete",
    ):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("case", ["dead_pid", "requeued", "no_heartbeat"])
def test_a_stale_lock_is_taken_over_and_released(tmp_path, monkeypatch, case):
    if case == "dead_pid":
        _held_by(tmp_path, pid=_dead_pid())
    elif case == "requeued":  # an earlier start of this Slurm job, on another node
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        _held_by(tmp_path, host="node-a", slurm_job_id="77", slurm_restart_count=1)
    else:  # another node, silent for longer than STALE_S
        _held_by(tmp_path, host="node-b")
        old = time.time() - run_lock.STALE_S - 5
        os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_on_another_node_with_a_heartbeat_is_not_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    _held_by(tmp_path, host="node-c", pid=1, slurm_job_id="77")  # another job, beating
    with pytest.raises(UserError, match="host node-c PID 1, Slurm job 77"):
        RunLock(tmp_path).acquire()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 1
    lock.release()
