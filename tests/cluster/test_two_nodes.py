"""Two "nodes" on one machine: network namespaces node1 (10.217.0.1) and node2 (10.217.0.2) joined
by a veth pair, each with its own hostname and /etc/hosts and its own slurmd.

- ``torchrun --nnodes 2`` per node with c10d rendezvous on node1, as a user without Slurm runs it;
- ``pretrain_salt.sbatch --nodes=2`` on the two slurmd daemons.

Both train TP=2 with one rank per node (every tensor-parallel all-reduce crosses the veth) and
must log the same losses, bitwise, as the same run on one node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import REPO, SlurmCluster
from tests.integration.conftest import launch, read_metrics

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CONFIG = "examples/configs/tiny_cpu.yaml"
ARGS = [
    "--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "10", "--log-interval", "1",
    "--eval-interval", "0", "--tensor-model-parallel-size", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The reference: the same run with both ranks on this host."""
    metrics = tmp_path_factory.mktemp("one-node") / "m.jsonl"
    proc = launch(["--config", CONFIG, *ARGS, "--metrics-file", str(metrics)], nproc=2, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return read_metrics(metrics)


def _assert_same(got: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def test_torchrun_two_nodes_c10d(
    two_node_cluster: SlurmCluster, one_node: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    metrics = tmp_path / "m.jsonl"
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29400", "--rdzv_id", "two-nodes",
        "pretrain_salt.py", "--config", CONFIG, *ARGS, "--metrics-file", str(metrics),
    ]  # fmt: skip
    procs = {
        node: subprocess.Popen(
            two_node_cluster.command(*torchrun, node=node),
            cwd=REPO,
            env=two_node_cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: killed whole on a timeout
        )
        for node in ("node1", "node2")
    }
    outs = {}
    try:
        for node, proc in procs.items():
            outs[node] = proc.communicate(timeout=240)[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for node, proc in procs.items():
        assert proc.returncode == 0, f"{node}:\n{outs.get(node, '')[-4000:]}"
    log = outs["node1"] + outs["node2"]
    assert "layout TP=2 PP=1 VPP=None DP=1" in log
    _assert_same(read_metrics(metrics), one_node)


def test_multi_node_sbatch(
    two_node_cluster: SlurmCluster, one_node: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "logs").mkdir()
    export = {"REPO_DIR": str(REPO), "GPUS_PER_NODE": "1", "CONFIG": CONFIG,
              "CKPT_DIR": str(tmp_path / "ckpt"), "LOG_ROOT": str(tmp_path / "logs")}  # fmt: skip
    options = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15:00",
               "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items())]  # fmt: skip
    metrics = tmp_path / "m.jsonl"
    job = two_node_cluster.sbatch(
        options, "examples/slurm/pretrain_salt.sbatch",
        [*ARGS, "--metrics-file", str(metrics)], cwd=tmp_path,
    )  # fmt: skip
    info = two_node_cluster.wait(job, timeout=240)
    out = (tmp_path / "logs" / f"salt-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out[-4000:]
    assert info["NodeList"] == "node[1-2]"
    launch_log = (tmp_path / "logs" / f"salt-{job}" / "launch.log").read_text()
    assert launch_log.startswith(f"job {job} restart 0 on 2 nodes x 1 GPUs, master node1")
    _assert_same(read_metrics(metrics), one_node)
