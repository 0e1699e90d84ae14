"""Shared by tools/demo.py and tools/study.py: launch pretrain_salt.py runs, read their curves.

- :func:`torchrun` runs a script under ``torch.distributed.run`` with its output in a log;
- :func:`train` runs one ``pretrain_salt.py`` job into its own directory and reads its
  :class:`Curve` (validation loss against step and training seconds, from ``--metrics-file``);
- :func:`store_targets` runs ``tools/save_teacher_targets.py`` (the one-off teacher pass) and
  reads its summary (:class:`TargetsPass`);
- :func:`data_flags` builds (or reuses) a corpus made on the machine (the demo's stdlib
  docstrings, or the larger Python-sources corpus) and returns its flags;
- :func:`plot` draws validation loss against step and wall-clock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
TARGETS = ["--top-k", "64", "--top-p", "0.95"]  # what the stored-target runs keep per token


class RunFailed(SystemExit):
    """A launched job exited with an error (its log names the cause)."""


@dataclass
class Curve:
    """Validation loss against step and training seconds, from a run's metrics file."""

    steps: list[int]
    losses: list[float]
    seconds: list[float]
    wall_s: float

    @classmethod
    def read(cls, metrics: Path, wall_s: float) -> Curve:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        elapsed = {r["step"]: r["elapsed_s"] for r in records if r["group"] == "train"}
        valid = [r for r in records if r["group"] == "valid"]
        steps = [r["step"] for r in valid]
        return cls(steps, [r["loss"] for r in valid], [elapsed.get(s, 0.0) for s in steps], wall_s)

    def first_step_reaching(self, target: float) -> tuple[int, float] | None:
        """First (step, seconds) with validation loss <= target."""
        for step, loss, sec in zip(self.steps, self.losses, self.seconds):
            if loss <= target:
                return step, sec
        return None


def torchrun(
    args: list[str],
    nproc: int,
    log: Path,
    script: str = "pretrain_salt.py",
    threads: int = 1,
    echo: bool = True,
) -> float:
    """Run ``script`` under torchrun (``threads`` OpenMP threads per process), its output in
    ``log``; echo its log lines (``[...]``) and errors when ``echo``; return wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           str(ROOT / script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if "error" in line.lower() or (echo and line.startswith(("[", "teacher targets: "))):
                print("   ", line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise RunFailed(f"{script} {' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def train(
    name: str,
    config: str,
    extra: list[str],
    out: Path,
    data: list[str],
    nproc: int = 2,
    threads: int = 1,
    echo: bool = True,
) -> Curve:
    """Train ``pretrain_salt.py --config examples/configs/<config> <data> <extra>`` afresh in
    ``out/name`` (metrics.jsonl, log.txt, tb/); return its validation curve."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the metrics file is appended to: start clean
    run_dir.mkdir(parents=True)
    args = ["--config", str(CONFIGS / config), *data,
            "--tensorboard-dir", str(run_dir / "tb"),
            "--metrics-file", str(run_dir / "metrics.jsonl"), *extra]  # fmt: skip
    print(f"== {name}", flush=True)
    wall = torchrun(args, nproc, run_dir / "log.txt", threads=threads, echo=echo)
    return Curve.read(run_dir / "metrics.jsonl", wall)


@dataclass
class TargetsPass:
    """The one-off teacher pass of tools/save_teacher_targets.py."""

    seconds: float  # the pass itself (teacher forwards, top-k, writes), as the tool reports it
    wall_s: float  # the whole command, start-up and dataset index included
    ids_per_token: float
    bytes_per_token: float

    @classmethod
    def read(cls, log: Path, wall_s: float) -> TargetsPass:
        text = log.read_text()
        found = re.search(r"([\d.]+) ids per token .*?([\d.]+) bytes per token.*?; this pass "
                          r"([\d.]+) s", text)  # fmt: skip
        if found is None:
            raise RunFailed(f"no summary line in {log}")
        ids, size, seconds = (float(x) for x in found.groups())
        return cls(seconds, wall_s, ids, size)


def store_targets(
    teacher_dir: Path,
    student_args: list[str],
    targets: Path,
    data: list[str],
    config: str = "demo_student.yaml",
    nproc: int = 2,
    threads: int = 1,
    echo: bool = True,
    logprob_format: str = "float16",
) -> TargetsPass:
    """The one-off pass: the teacher's targets of the KD phase's samples of the student run
    ``student_args`` (its seed, steps, ``--kd-steps``, T), stored afresh under ``targets`` with
    ``--logprob-format logprob_format``; the log goes beside it (``targets.log``)."""
    shutil.rmtree(targets, ignore_errors=True)
    args = ["--out", str(targets), *TARGETS, "--logprob-format", logprob_format,
            "--config", str(CONFIGS / config), *data,
            *student_args, "--kd-teacher-load", str(teacher_dir)]  # fmt: skip
    print(f"== teacher targets (tools/save_teacher_targets.py) -> {targets}", flush=True)
    log = targets.with_name(targets.name + ".log")
    wall = torchrun(args, nproc, log, script="tools/save_teacher_targets.py", threads=threads,
                    echo=echo)  # fmt: skip
    return TargetsPass.read(log, wall)


def existing_targets(targets: Path) -> TargetsPass:
    """A store made earlier (no pass timed: 0 s), its ids and bytes per token from its shards."""
    from salt_megatron.data.teacher_targets import read_spec
    from salt_megatron.distill.targets import store_summary

    summary = store_summary(str(targets), read_spec(str(targets)))
    return TargetsPass(0.0, 0.0, summary["mean_ids_per_token"], summary["bytes_per_token"])


def data_flags(cache: Path, corpus: str = "docstrings") -> list[str]:
    """Build (or reuse) a corpus made on the machine (``docstrings``: the demo's stdlib
    docstrings; ``code``: the Python sources of the stdlib and the installed packages), its
    tokenizer and dataset under ``cache``; return the ``pretrain_salt.py`` flags that read them."""
    from salt_megatron.runtime.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron-core is imported
    from salt_megatron.data.demo import prepare_code_data, prepare_demo_data

    if corpus == "code":
        print("== data: Python sources corpus, tokenizer, indexed dataset", flush=True)
        paths = prepare_code_data(cache)
    else:
        print("== data: stdlib docstring corpus, tokenizer, indexed dataset", flush=True)
        paths = prepare_demo_data(cache)
    return ["--data-path", paths.data_prefix, "--tokenizer-model", paths.tokenizer_model,
            "--data-cache-path", str(cache / "index")]  # fmt: skip


def demo_data_flags(cache: Path) -> list[str]:
    """:func:`data_flags` of the demo's stdlib-docstring corpus."""
    return data_flags(cache, "docstrings")


def plot(curves: dict[str, Curve], path: Path, title: str | None = None) -> bool:
    """Validation loss against step (left) and training wall-clock (right); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in curves.items():
        axes[0].plot(curve.steps, curve.losses, marker="o", ms=3, label=label)
        axes[1].plot(curve.seconds, curve.losses, marker="o", ms=3, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
