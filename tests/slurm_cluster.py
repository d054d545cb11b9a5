"""A real one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd, all configured,
keyed and logging inside one temporary directory, on free ports, stopped at the end.

Needs the Debian packages scripts/setup_system.sh installs (slurmctld, slurmd, slurm-client, munge). The
daemons run as the current user (root on our CI and development machines); nothing outside the temporary
directory is read or written, so a cluster already on the machine is left alone.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise TimeoutError(f"{what} within {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


class SlurmCluster:
    """One node ("localhost", every CPU of the machine) in one partition ("debug")."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        (self.root / "state").mkdir(parents=True)
        (self.root / "spool").mkdir()
        self._start_munge()
        user = getpass.getuser()
        settings = {
            "ClusterName": "popotest",
            "SlurmctldHost": "localhost",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.root / 'munge.socket'}",
            "SlurmUser": user,
            "SlurmdUser": user,
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd.log",
            # No cgroups in containers: track processes through /proc, bind nothing.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill",
            "ReturnToService": 2,
            "JobRequeue": 1,
            "MpiDefault": "none",
            "SwitchType": "switch/none",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines += [
            f"NodeName=localhost CPUs={os.cpu_count()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self._spawn(["slurmctld", "-D", "-c", "-f", str(self.conf)], "slurmctld.out")
        _wait_for(self._controller_answers, 60, "slurmctld did not answer", self.root / "slurmctld.log")
        self._spawn(["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd.out")
        _wait_for(self._node_idle, 60, "the node did not become idle", self.root / "slurmd.log")

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # --force: munged otherwise refuses a key and socket outside its own /etc and /run directories.
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.root / 'munge.socket'}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munge.seed'}",
            ],
            "munged.out",
        )
        _wait_for((self.root / "munge.socket").exists, 30, "munged did not start", self.root / "munged.out")

    def _spawn(self, command: list[str], log_name: str) -> None:
        log = open(self.root / log_name, "w")
        self._daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def _controller_answers(self) -> bool:
        return self._run("scontrol", "ping").stdout.count("UP") > 0

    def _node_idle(self) -> bool:
        return "State=IDLE" in self._run("scontrol", "show", "node", "localhost").stdout

    def stop(self) -> None:
        # Jobs a failed test left running: their processes outlive slurmd, so cancel them first.
        try:
            self._run("scancel", "--partition=debug", "--full")
            _wait_for(lambda: not self._run("squeue", "--noheader").stdout.strip(), 30, "jobs did not end")
        except (subprocess.SubprocessError, TimeoutError):
            pass  # stopping the daemons below matters more
        for daemon in reversed(self._daemons):  # slurmd, slurmctld, then munged
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    # -- jobs --------------------------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        # The scripts' default rendezvous port (29500 + job id) can be held by another test's world on this
        # machine: every job gets a free one.
        env = {"MASTER_PORT": str(free_port()), **self.env, **env}
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's record of the job (finished jobs stay for MinJobAge, 300 s by default)."""
        text = self._run("scontrol", "show", "job", str(job_id), "--oneliner").stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id: int, timeout: float, log: Path, requeues: int | None = None) -> dict[str, str]:
        """Wait until the job has ended or, with `requeues`, is pending again after that many requeues."""

        def settled() -> bool:
            job = self.job(job_id)
            if job.get("JobState") in ENDED:
                return True
            return requeues is not None and job.get("JobState") == "PENDING" and int(job["Restarts"]) >= requeues

        _wait_for(settled, timeout, f"job {job_id} did not end or requeue", log)
        return self.job(job_id)

    def signal_batch_script(self, job_id: int, name: str) -> None:
        proc = self._run("scancel", f"--signal={name}", "--batch", str(job_id))
        assert proc.returncode == 0, proc.stderr

    def cancel(self, job_id: int) -> None:
        proc = self._run("scancel", str(job_id))
        assert proc.returncode == 0, proc.stderr

    def start_now(self, job_id: int) -> None:
        """A requeued job waits (120 s on this Slurm) before it may start again; let it start now.

        Not in the second its previous run ended: slurmd revokes that run's credential with a timestamp in
        whole seconds, and refuses a new one issued in the same second ("Job credential revoked").
        """
        time.sleep(2)
        proc = self._run("scontrol", "update", f"jobid={job_id}", "starttime=now")
        assert proc.returncode == 0, proc.stderr
