"""Launching ``pretrain_salt.py`` for end-to-end tests: :func:`launch` and :func:`start`.

Each launch costs seconds of imports per process: run many checks per launch. Every rank gets
``OMP_NUM_THREADS=1``; torchrun picks a free port (``--rdzv-endpoint localhost:0``). With one
process the script runs without torchrun, so its exit code comes back as is (torchrun turns any
failing rank's code into 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pretrain_salt.py"


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:  # no torchrun: faster, and the script's own exit code comes back
        return [sys.executable, str(SCRIPT), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        str(SCRIPT),
        *args,
    ]


def _env(env: dict[str, str] | None) -> dict[str, str]:
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**merged, **(env or {})}


def launch(
    args: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun --nproc_per_node nproc pretrain_salt.py *args``; stdout+stderr in stdout."""
    return subprocess.run(
        _command(args, nproc),
        env=_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_tool(
    name: str, args: list[str], timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python tools/<name> *args`` in one process, with :func:`launch`'s environment."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(
    args: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[str]:
    """Like :func:`launch` but returns the running torchrun (to signal it mid-run)."""
    return subprocess.Popen(
        _command(args, nproc),
        env=_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_metrics(path: str | os.PathLike[str], group: str = "train") -> dict[int, dict[str, Any]]:
    """The ``--metrics-file`` records of ``group``, by step (the last record of a step wins)."""
    out: dict[int, dict[str, Any]] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("group") == group:
                out[int(record["step"])] = record
    return out
