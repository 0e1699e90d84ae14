"""Private Slurm clusters for the ``cluster`` tests, started by ``tests/cluster/slurm_cluster.sh``:
one node on this host (:func:`slurm_cluster`), or two nodes in network namespaces
(:func:`two_node_cluster`). Each fixture stops its daemons and removes its namespaces when its
module ends, also when a test fails; it skips, naming what is missing, without root or without
the Slurm and munge binaries.

Jobs get the environment a user would have after activating the venv: this interpreter's ``bin``
first on ``PATH``, the repository on ``PYTHONPATH``, the cluster's ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}  # fmt: skip
#: CPU overrides for the GPU-node sbatch scripts: one node, no GPUs, its two cores for two ranks.
CPU_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15:00"]


def rendezvous_port() -> int:
    """A TCP port free now and below the kernel's ephemeral range, for a job's ``MASTER_PORT``.

    A job keeps its port across requeues, so it must stay free from submission to the last
    restart. Ports the kernel hands out (bind to port 0) lie in the ephemeral range, where any
    such socket may take it meanwhile: srun's listeners, the ranks' gloo pairs (hundreds a
    minute here). torchrun then cannot host its rendezvous store and fails after its 60 s
    connect timeout. Nothing takes a port below that range unless it asks for that port.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in [20000, {low})")


def _missing(nodes: int) -> str | None:
    if os.geteuid() != 0:
        return "the Slurm cluster tests need root (they start munged, slurmctld and slurmd)"
    tools = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel"]
    if nodes == 2:
        tools += ["ip", "nsenter", "unshare"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge iproute2)"
    return None


@dataclass
class SlurmCluster:
    """A running private cluster: run Slurm commands on its controller node, submit, wait."""

    root: Path
    nodes: int

    def env(self, **extra: str) -> dict[str, str]:
        """The submitting shell's environment (jobs inherit it with ``--export=ALL``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(
            SLURM_CONF=str(self.root / "slurm.conf"),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def command(self, *argv: str, node: str = "node1") -> list[str]:
        """``argv`` as run on ``node`` (inside its namespaces on a two-node cluster)."""
        if self.nodes == 1:
            return list(argv)
        return ["bash", str(SCRIPT), "exec", str(self.root), node, *argv]

    def run(self, *argv: str, cwd: Path | None = None, **env: str) -> str:
        """Run a Slurm command on the controller's node; its stdout (fails on a non-zero exit)."""
        proc = subprocess.run(
            self.command(*argv), cwd=cwd, env=self.env(**env), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        return proc.stdout

    def sbatch(self, options: list[str], script: str, args: list[str], cwd: Path) -> int:
        """``sbatch --parsable *options script *args`` from ``cwd``; the job id."""
        out = self.run("sbatch", "--parsable", *options, str(REPO / script), *args, cwd=cwd)
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with its log after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                log = Path(info.get("StdOut", ""))
                tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
                pytest.fail(f"job {job_id} still {info['JobState']} after {timeout} s:\n{tail}")
            time.sleep(0.5)


def _start(nodes: int, keep_logs: Path) -> Iterator[SlurmCluster]:
    reason = _missing(nodes)
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dirs: munged wants its socket's directories searchable by all.
    root = Path(tempfile.mkdtemp(prefix="salt-slurm-"))
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", str(root), str(nodes)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "log").glob("*.log")))
            pytest.fail(f"the {nodes}-node Slurm cluster did not start:\n{proc.stderr}\n{logs}")
        yield SlurmCluster(root, nodes)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], timeout=120, check=False)
        if (root / "log").is_dir():  # kept for a failure's post-mortem
            shutil.copytree(root / "log", keep_logs, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node (this host, all its cores) on 127.0.0.1."""
    yield from _start(1, tmp_path_factory.mktemp("slurm-logs"))


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """node1 and node2 (one core each), each in its own network namespace."""
    yield from _start(2, tmp_path_factory.mktemp("slurm2-logs"))
