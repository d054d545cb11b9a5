"""The Slurm scripts, and the multi-node rendezvous they rely on.

- Every script passes `bash -n` and shellcheck (tests/test_shell_scripts.py).
- Two torchrun agents with different node ranks on loopback (two "nodes", as train.sbatch starts them)
  form one world and train a step of the tiny config.
- On a real Slurm (slurmctld + slurmd + munged on localhost, see slurm_cluster.py), train.sbatch runs the
  tiny config at two ranks to the end; a second job, sent USR1 mid-run (`scancel --signal=USR1 --batch`,
  what `#SBATCH --signal` does before the time limit), writes a checkpoint, requeues itself, resumes
  and ends bit-identical to the first. A job given little time stops by itself before its time limit
  (STOP_MARGIN_S) with a checkpoint and requeues (or, submitted with --no-requeue, fails saying how to
  resume); one given less time than the margin is refused.
  convert.sbatch takes a model HF -> Megatron -> HF unchanged; eval.sbatch scores the trained checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import assert_same_run, records
from slurm_cluster import SlurmCluster, free_port, missing_binaries

ROOT = Path(__file__).parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
EXAMPLE = ROOT / "examples" / "tiny_cpu.yaml"


def test_there_are_train_convert_and_eval_scripts():
    assert {p.name for p in SCRIPTS} == {"train.sbatch", "convert.sbatch", "eval.sbatch"}


def test_two_torchrun_agents_on_loopback_form_one_world_and_train(tmp_path):
    from popo_megatron.data.synthetic import save_arithmetic_model

    model = save_arithmetic_model(tmp_path / "model", seed=3)
    out = tmp_path / "run"
    port = free_port()
    agents = []
    for node in range(2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "popo_megatron",
            "train",
            str(EXAMPLE),
            f"model.hf_path={model}",
            f"train.output_dir={out}",
            "train.steps=1",
            "train.prompts_per_step=8",
            "rollout.n=4",
            "reward.workers=1",
        ]
        log = open(tmp_path / f"node{node}.log", "w")
        agents.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)))
    codes = [agent.wait(timeout=600) for agent in agents]
    logs = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace")[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    assert json.loads((out / "run_state.json").read_text())["complete"]
    ranks = sorted(p.name for p in (out / "checkpoints" / "step_000001" / "rng").iterdir())
    assert ranks == ["rank_0.pt", "rank_1.pt"], "one world of two ranks, one per node"


# The tiny config at two ranks (DP 2), no scheduled checkpoints (only the final one, or the one a signal
# asks for). Its steps take ~0.1 s here: 30 of them leave the preemption test seconds to signal mid-run.
STEPS = 30
JOB_ARGS = [
    f"train.steps={STEPS}",
    "train.checkpoint_every=0",
    "train.prompts_per_step=8",
    "rollout.n=4",
    "reward.workers=1",
]
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    assert not missing, f"{', '.join(missing)} not installed: scripts/setup_system.sh installs Slurm and munge"
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_model(tmp_path_factory) -> Path:
    from popo_megatron.data.synthetic import save_arithmetic_model

    return save_arithmetic_model(tmp_path_factory.mktemp("model") / "arith", seed=5)


def _submit_train(
    slurm: SlurmCluster, workdir: Path, model: Path, *sbatch_options: str, env: dict[str, str] | None = None
) -> int:
    workdir.mkdir()
    return slurm.sbatch(
        "--gpus-per-node=0",  # the script's default is 8; this cluster has CPUs only
        *sbatch_options,
        str(ROOT / "slurm" / "train.sbatch"),
        str(EXAMPLE),
        f"model.hf_path={model}",
        f"train.output_dir={workdir / 'run'}",
        *JOB_ARGS,
        cwd=workdir,
        env={"NPROC_PER_NODE": "2", "POPO_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _job_log(workdir: Path, job_id: int) -> Path:
    return workdir / f"popo-train-{job_id}.out"


@pytest.fixture(scope="module")
def straight_job(slurm, job_model, tmp_path_factory) -> tuple[Path, int]:
    """One train.sbatch job that runs to the end undisturbed."""
    workdir = tmp_path_factory.mktemp("jobs") / "straight"
    job_id = _submit_train(slurm, workdir, job_model)
    job = slurm.wait_for_job(job_id, JOB_TIMEOUT, _job_log(workdir, job_id))
    log = _job_log(workdir, job_id).read_text(errors="replace")
    assert job["JobState"] == "COMPLETED", f"job {job_id}: {job.get('JobState')} ({job.get('Reason')})\n{log[-4000:]}"
    return workdir, job_id


def test_train_sbatch_runs_the_job_at_the_layout_it_prints(straight_job):
    workdir, job_id = straight_job
    run = workdir / "run"
    log = _job_log(workdir, job_id).read_text(errors="replace")
    assert "world 2 ranks: TP 1 x PP 1 x CP 1 x DP 2" in log, "the layout line is printed before the ranks start"
    assert f"step {STEPS}/{STEPS} | reward" in log and f"complete ({STEPS}/{STEPS} steps)" in log
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))
    assert json.loads((run / "run_state.json").read_text())["complete"]
    ranks = sorted(p.name for p in (run / "checkpoints" / f"step_{STEPS:06d}" / "rng").iterdir())
    assert ranks == ["rank_0.pt", "rank_1.pt"]
    rank_logs = sorted(p.relative_to(workdir).as_posix() for p in (workdir / "logs").rglob("stdout.log"))
    assert len(rank_logs) == 2 and all(p.startswith(f"logs/{job_id}/node0/") for p in rank_logs), rank_logs


def test_a_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, job_model, straight_job, tmp_path):
    workdir = tmp_path / "preempted"
    job_id = _submit_train(slurm, workdir, job_model)
    log = _job_log(workdir, job_id)
    run = workdir / "run"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (run / "metrics.jsonl").is_file() or len(records(run)) < 2:
        assert slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the job did not reach step 2"
        time.sleep(0.05)
    slurm.signal_batch_script(job_id, "USR1")

    requeued = slurm.wait_for_job(job_id, JOB_TIMEOUT, log, requeues=1)
    text = log.read_text(errors="replace")
    assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", f"{requeued}\n{text[-4000:]}"
    stopped_at = json.loads((run / "run_state.json").read_text())
    assert stopped_at["stopped_by"] == "signal" and 2 <= stopped_at["step"] < STEPS, stopped_at
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at['step']:06d}"
    assert "requeueing job" in text

    slurm.start_now(job_id)
    finished = slurm.wait_for_job(job_id, JOB_TIMEOUT, log)
    text = log.read_text(errors="replace")
    assert finished["JobState"] == "COMPLETED", text[-4000:]
    assert "restart 1" in text and f"resumed from {run / 'checkpoints'}" in text
    assert json.loads((run / "run_state.json").read_text())["complete"]
    resumed = [r for r in records(run) if r["step"] > stopped_at["step"]]
    assert any(r["positive_frac"] > 0 for r in resumed), "no step after the resume updated the policy"
    assert_same_run(straight_job[0] / "run", run, step=STEPS)


def test_a_job_near_its_time_limit_stops_with_a_checkpoint_and_requeues(slurm, job_model, tmp_path):
    # 180 s of time, stop 172 s before the end: a few seconds for start-up and a step or so. The script's
    # --signal=B:USR1@600 would fire at once in a 3-minute job: move it out of the way, so the stop is the
    # time limit's own.
    workdir = tmp_path / "limited"
    job_id = _submit_train(slurm, workdir, job_model, "--time=3", "--signal=B:USR1@1", env={"STOP_MARGIN_S": "172"})
    log = _job_log(workdir, job_id)
    try:
        requeued = slurm.wait_for_job(job_id, JOB_TIMEOUT, log, requeues=1)
        text = log.read_text(errors="replace")
        assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", f"{requeued}\n{text[-4000:]}"
        stopped_at = json.loads((workdir / "run" / "run_state.json").read_text())
        assert stopped_at["stopped_by"] == "time" and 1 <= stopped_at["step"] < STEPS, stopped_at
        assert (workdir / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at['step']:06d}"
    finally:
        slurm.cancel(job_id)


def test_a_time_limit_shorter_than_the_stop_margin_is_refused(slurm, job_model, tmp_path):
    workdir = tmp_path / "short"
    job_id = _submit_train(slurm, workdir, job_model, "--time=1")  # 60 s against the default margin of 600 s
    job = slurm.wait_for_job(job_id, JOB_TIMEOUT, _job_log(workdir, job_id))
    text = _job_log(workdir, job_id).read_text(errors="replace")
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", text
    assert "not more than STOP_MARGIN_S=600" in text and not (workdir / "run").exists()


def _run_job(slurm: SlurmCluster, workdir: Path, script: str, *args: str) -> str:
    """Submit slurm/SCRIPT with ARGS, wait for it to end, return its log; it must complete."""
    workdir.mkdir(exist_ok=True)
    job_id = slurm.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        str(ROOT / "slurm" / script),
        *args,
        cwd=workdir,
        env={"NPROC_PER_NODE": "2", "POPO_PYTHON": sys.executable},
    )
    log = workdir / f"popo-{script.split('.')[0]}-{job_id}.out"
    job = slurm.wait_for_job(job_id, JOB_TIMEOUT, log)
    text = log.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED", f"{script}: {job.get('JobState')}\n{text[-4000:]}"
    return text


def test_convert_sbatch_round_trips_a_model_through_megatron(slurm, job_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    mcore, export = tmp_path / "mcore", tmp_path / "export"
    # Both run under torchrun (NPROC_PER_NODE=2 processes), each sharing its work between them.
    _run_job(slurm, tmp_path, "convert.sbatch", "hf-to-mcore", "--hf", str(job_model), "--out", str(mcore))
    _run_job(slurm, tmp_path, "convert.sbatch", "mcore-to-hf", "--ckpt", str(mcore), "--out", str(export))
    original = load_file(job_model / "model.safetensors")
    exported = {}
    for shard in export.glob("*.safetensors"):
        exported.update(load_file(shard))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_eval_sbatch_scores_the_trained_checkpoint(slurm, straight_job, tmp_path):
    checkpoint = straight_job[0] / "run" / "checkpoints" / f"step_{STEPS:06d}"
    out = tmp_path / "eval"
    args = ["--benchmark", "synthetic", "--k", "2", "--out", str(out), "data.synthetic.size=16"]
    log = _run_job(slurm, tmp_path, "eval.sbatch", str(checkpoint), *args)
    result = json.loads((out / "synthetic.json").read_text())
    assert (result["problems"], result["k"], len(result["records"])) == (16, 2, 16)
    assert f"synthetic: avg@2 {result['avg_at_k']:.4f}" in log


def test_a_stopped_job_that_may_not_requeue_says_how_to_resume(slurm, job_model, tmp_path):
    workdir = tmp_path / "no-requeue"
    # STOP_MARGIN_S as in the time-limit test: the run stops after a step or so and wants to requeue.
    job_id = _submit_train(
        slurm, workdir, job_model, "--time=3", "--signal=B:USR1@1", "--no-requeue", env={"STOP_MARGIN_S": "172"}
    )
    job = slurm.wait_for_job(job_id, JOB_TIMEOUT, _job_log(workdir, job_id), requeues=1)
    text = _job_log(workdir, job_id).read_text(errors="replace")
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", f"{job}\n{text[-4000:]}"
    assert "resubmit the same command to resume" in text
    assert json.loads((workdir / "run" / "run_state.json").read_text())["stopped_by"] == "time"
