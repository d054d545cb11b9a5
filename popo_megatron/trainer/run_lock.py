"""One job per run directory: OUTPUT_DIR/run.lock, held by the run's rank 0 for as long as it trains.

Two jobs on one directory would delete each other's checkpoints and run state. The lock names its holder
(host, PID, Slurm job id and restart count, start time) and is kept alive by a heartbeat (its mtime, every
HEARTBEAT_S). A second job refuses at once with one line naming the holder. A lock is stale, and taken
over with a warning, when its holder is certainly gone: a dead PID on this host, an earlier start of this
same Slurm job (a requeue: Slurm never runs two starts of one job), or no heartbeat for STALE_S.

Why not flock: advisory locks are not reliable across the nodes of a shared file system (NFS, Lustre
without `flock` mounts), where Slurm jobs meet.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from popo_megatron.errors import UserError
from popo_megatron.logs import get_logger

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats

log = get_logger("trainer")


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _why_stale(held: dict, age_s: float, me: dict) -> str | None:
    """Why the lock's holder is certainly gone, or None while it may be alive."""
    if held.get("host") == me["host"] and not _pid_alive(int(held.get("pid", -1))):
        return f"its process {held.get('pid')} on this host is gone"
    job = held.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and held.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
        return f"it is an earlier start of this Slurm job ({job}, requeued)"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


def _describe(held: dict, age_s: float) -> str:
    job = f", Slurm job {held['slurm_job_id']}" if held.get("slurm_job_id") else ""
    return (
        f"host {held.get('host')} PID {held.get('pid')}{job}, started {held.get('started')}, "
        f"last heartbeat {age_s:.0f} s ago"
    )


class RunLock:
    """The run directory's lock, held (with its heartbeat) from `acquire` until `release`."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.me = _holder()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a UserError naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            held, age_s = self._read()
            why = _why_stale(held, age_s, self.me)
            if why is None:
                raise UserError(
                    f"{self.path.parent} is in use by another run ({_describe(held, age_s)}): wait for it to end or "
                    f"use another train.output_dir; if that run is dead, delete {self.path}"
                )
            self._take_over()
            log.warning(f"took over the stale lock {self.path} of {_describe(held, age_s)}: {why}")
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
            held, _ = self._read()
            if (held.get("host"), held.get("pid")) == (self.me["host"], self.me["pid"]):
                self.path.unlink(missing_ok=True)

    # --- the file ---------------------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self) -> None:
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me['host']}.{self.me['pid']}")
        tmp.write_text(json.dumps(self.me), encoding="utf-8")
        os.replace(tmp, self.path)
        time.sleep(0.5)  # two jobs taking over at once: the last rename wins, the other sees it and refuses
        held, age_s = self._read()
        if (held.get("host"), held.get("pid")) != (self.me["host"], self.me["pid"]):
            raise UserError(f"{self.path.parent} was just taken by another run ({_describe(held, age_s)})")

    def _read(self) -> tuple[dict, float]:
        """The lock's holder and the seconds since its last heartbeat ({} when unreadable or gone)."""
        try:
            age_s = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text(encoding="utf-8")), age_s
        except (OSError, ValueError):
            return {}, float("inf")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as exc:  # the run goes on; a second job may then take the lock as stale
                log.warning(f"run lock heartbeat failed: {exc}")
