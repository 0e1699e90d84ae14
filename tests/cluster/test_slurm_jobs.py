"""The project's sbatch scripts, unedited, under a real one-node Slurm with CPU overrides.

- The SALT job chain as a user runs it: ``train_teacher.sbatch``, then ``pretrain_salt.sbatch``
  with ``--dependency=afterok`` distilling from that teacher, logging to W&B (offline).
- Preemption: ``scancel --signal=USR1 --batch`` during a second SALT job makes it save, exit,
  requeue itself and resume; its losses equal the uninterrupted job's bitwise, across the switch.
- A bad config ends as FAILED with the project's error in the job's log.

Every job is submitted up front, as a user would; each takes both cores (``--exclusive``), so
Slurm runs them back to back: bad config, teacher, the uninterrupted SALT job, the preempted one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.conftest import CPU_NODE, REPO, SlurmCluster, rendezvous_port
from tests.integration.conftest import read_metrics
from tests.wandb_files import offline_runs, read_offline_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

COMMON = [
    "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--log-interval", "1", "--split", "90,5,5", "--lr", "3e-3",
    "--eval-interval", "0",
]  # fmt: skip
TEACHER = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
           "--train-iters", "6"]  # fmt: skip
KD_STEPS, STEPS = 40, 56  # a long KD phase: the signal lands in it even on a busy machine
STUDENT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--train-iters", str(STEPS), "--kd-steps", str(KD_STEPS), "--kd-weight", "0.5",
    "--kd-schedule", "linear", "--tensor-model-parallel-size", "2",
]  # fmt: skip
PRETRAIN, TRAIN_TEACHER = (
    "examples/slurm/pretrain_salt.sbatch",
    "examples/slurm/train_teacher.sbatch",
)


@dataclass
class Jobs:
    """The submitted jobs' ids and their shared submit directory."""

    cluster: SlurmCluster
    work: Path
    bad: int
    teacher: int
    salt: int
    preempted: int

    def log(self, name: str, job: int) -> str:
        """The job's own output, ``logs/%x-%j.out`` under the submit directory."""
        return (self.work / "logs" / f"{name}-{job}.out").read_text()

    def post_mortem(self, name: str, job: int, chars: int = 6000) -> str:
        """The end of the job's output (its batch shell, torchrun and, tee'd, every rank) and its
        launch log: what a failed assertion on ``job`` prints, so a CI failure explains itself."""
        logs = self.work / "logs"
        files = [logs / f"{name}-{job}.out", logs / f"{name}-{job}" / "launch.log"]
        parts = [f"==> {f} <==\n{f.read_text()[-chars:]}" for f in files if f.is_file()]
        return "\n".join(parts) or f"(no logs under {logs})"


def _export(work: Path, run: str, **extra: str) -> str:
    """``--export=ALL,...``: the CPU overrides a user passes to the GPU scripts (and a free
    rendezvous port outside the ephemeral range: this node is the test machine itself)."""
    env = {"REPO_DIR": str(REPO), "GPUS_PER_NODE": "2", "CONFIG": "examples/configs/tiny_cpu.yaml",
           "CKPT_DIR": str(work / run), "LOG_ROOT": str(work / "logs"),
           "MASTER_PORT": str(rendezvous_port()), **extra}  # fmt: skip
    return "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())


@pytest.fixture(scope="module")
def jobs(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    work = tmp_path_factory.mktemp("slurm-jobs")
    (work / "logs").mkdir()  # sbatch's --output=logs/%x-%j.out: the directory must exist

    def submit(options: list[str], script: str, args: list[str]) -> int:
        return slurm_cluster.sbatch([*CPU_NODE, *options], script, args, cwd=work)

    bad = submit([_export(work, "bad")], PRETRAIN,
                 [*COMMON, "--num-layers", "3", "--pipeline-model-parallel-size", "2"])  # fmt: skip
    teacher = submit([_export(work, "teacher")], TRAIN_TEACHER, [*COMMON, *TEACHER])
    after = f"--dependency=afterok:{teacher}"
    salt_args = [*COMMON, *STUDENT, "--kd-teacher-load", str(work / "teacher")]
    salt = submit([after, _export(work, "salt", WANDB_MODE="offline")], PRETRAIN,
                  [*salt_args, "--metrics-file", str(work / "salt.jsonl"),
                   "--wandb-project", "salt-cluster", "--wandb-exp-name", "salt"])  # fmt: skip
    preempted = submit([after, _export(work, "preempted")], PRETRAIN,
                       [*salt_args, "--metrics-file", str(work / "preempted.jsonl")])  # fmt: skip
    return Jobs(slurm_cluster, work, bad, teacher, salt, preempted)


def test_bad_config_fails_with_the_error_in_its_log(jobs: Jobs) -> None:
    info = jobs.cluster.wait(jobs.bad, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), info
    log = jobs.log("salt", jobs.bad)
    assert "pretrain_salt.py: error: --num-layers 3 is not divisible by the 2 pipeline" in log


def test_teacher_then_salt_chain(jobs: Jobs) -> None:
    cluster, work = jobs.cluster, jobs.work
    teacher = cluster.wait(jobs.teacher, timeout=240)
    salt = cluster.wait(jobs.salt, timeout=240)
    assert teacher["JobState"] == salt["JobState"] == "COMPLETED", "\n".join(
        [jobs.post_mortem("salt-teacher", jobs.teacher), jobs.post_mortem("salt", jobs.salt)]
    )
    assert salt["StartTime"] >= teacher["EndTime"]  # afterok held it back
    assert "saved checkpoint" in jobs.log("salt-teacher", jobs.teacher)
    assert (work / "teacher" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"

    log = jobs.log("salt", jobs.salt)
    assert f"from {work / 'teacher'}/iter_0000006" in log
    assert f"step {KD_STEPS}: KD phase over, teacher released" in log
    launch = (work / "logs" / f"salt-{jobs.salt}" / "launch.log").read_text()
    assert launch.startswith(f"job {jobs.salt} restart 0 on 1 nodes x 2 GPUs, master ")
    ranks = work / "logs" / f"salt-{jobs.salt}" / "torchrun-restart0"
    assert len(list(ranks.glob("*/attempt_0/*/stdout.log"))) == 2  # per-rank logs, both ranks
    assert list((work / "salt" / "tensorboard").glob("events.out.tfevents.*"))

    metrics = read_metrics(work / "salt.jsonl")
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert all(metrics[s]["kd_weight"] > 0 for s in range(1, KD_STEPS + 1))
    assert not any("kd_loss" in metrics[s] for s in range(KD_STEPS + 1, STEPS + 1))

    (run_dir,) = offline_runs(work / "salt" / "wandb")  # <CKPT_DIR>/wandb: the logging rank's
    run = read_offline_run(run_dir)
    assert run.name == "salt" and run.config["distill"]["kd_steps"] == KD_STEPS
    for s in range(1, KD_STEPS + 1):
        assert run.history[s]["train/kd_loss"] == metrics[s]["kd_loss"], s


def _wait_for_steps(jobs: Jobs, metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while len(read_metrics(metrics)) < steps:
        state = jobs.cluster.job(jobs.preempted)["JobState"]
        ok = state in {"PENDING", "RUNNING"} and time.monotonic() < deadline
        assert ok, f"{state}\n{jobs.post_mortem('salt', jobs.preempted)}"
        time.sleep(0.2)


def test_preemption_saves_requeues_and_resumes_bitwise(jobs: Jobs) -> None:
    cluster, work, job = jobs.cluster, jobs.work, jobs.preempted
    metrics = work / "preempted.jsonl"
    _wait_for_steps(jobs, metrics, 3)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@180 does
    info = cluster.wait(job, timeout=240)
    state = (info["JobState"], info["Restarts"], info["ExitCode"])
    assert state[:2] == ("COMPLETED", "1"), f"{state}\n{jobs.post_mortem('salt', job)}"

    log = jobs.log("salt", job)
    stopped = int(re.findall(r"exiting early: received SIGUSR1; checkpoint at step (\d+)", log)[0])
    assert 3 <= stopped < KD_STEPS, f"stopped at {stopped}: the resumed part must cross the switch"
    assert f"saved after the signal; requeueing job {job}" in log
    assert f"resumed from {work / 'preempted'}/iter_{stopped:07d}: step {stopped}" in log
    launch = (work / "logs" / f"salt-{job}" / "launch.log").read_text()
    assert f"job {job} restart 0 " in launch and f"job {job} restart 1 " in launch

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r["group"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # each step once: no step lost or redone
    got, ref = read_metrics(metrics), read_metrics(work / "salt.jsonl")
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])  # bitwise
        assert got[s].get("kd_loss") == ref[s].get("kd_loss"), s
