"""The README's main job: SALT against a baseline at small scale, on 2 CPU processes.

1. the embedded corpus (stdlib docstrings), its tokenizer and indexed dataset (cached);
2. a small teacher, trained and saved by our own trainer;
3. a baseline student and a SALT student (KD from the teacher for the first ``kd_steps``), same
   steps and data order, student TP=2 with a TP=1 teacher;
4. a table: final validation loss of each, the step at which SALT first reaches the baseline's
   final validation loss, wall-clock (the teacher's share included) and the implied saving; a PNG
   of validation loss against step and wall-clock; TensorBoard logs under ``runs/demo``.

    python tools/demo.py            # 15-17 minutes on 2 cores
    python tools/demo.py --quick    # a couple of minutes (the integration test)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from salt_megatron.runtime.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before megatron-core is imported
from salt_megatron.data.demo import prepare_demo_data  # noqa: E402

QUICK = {
    "teacher": ["--train-iters", "40", "--eval-interval", "20"],
    "student": ["--train-iters", "40", "--kd-steps", "16", "--eval-interval", "8",
                "--num-layers", "2", "--hidden-size", "128", "--log-interval", "4"],
}  # fmt: skip


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


def torchrun(args: list[str], nproc: int, log: Path) -> float:
    """Run pretrain_salt.py under torchrun, tee its output to ``log``; return wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           str(ROOT / "pretrain_salt.py"), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if line.startswith("[") or "error" in line.lower():
                print("   ", line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"demo: {' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def train(name: str, config: str, extra: list[str], out: Path, data: list[str]) -> Curve:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    args = ["--config", str(ROOT / "examples/configs" / config), *data,
            "--tensorboard-dir", str(run_dir / "tb"),
            "--metrics-file", str(run_dir / "metrics.jsonl"), *extra]  # fmt: skip
    print(f"== {name}", flush=True)
    wall = torchrun(args, 2, run_dir / "log.txt")
    return Curve.read(run_dir / "metrics.jsonl", wall)


def report(base: Curve, salt: Curve, teacher: Curve, out: Path) -> str:
    target = base.losses[-1]
    hit = salt.first_step_reaching(target)
    rows = ["| run | final val loss | train wall-clock (s) |", "|---|---|---|"]
    for name, curve in (
        ("teacher (trained once, reusable)", teacher),
        ("baseline student", base),
        ("SALT student (teacher forward included)", salt),
    ):
        rows.append(f"| {name} | {curve.losses[-1]:.4f} | {curve.seconds[-1]:.1f} |")
    if hit is None:
        rows.append(f"\nSALT did not reach the baseline's final validation loss {target:.4f}.")
    else:
        step, sec = hit
        saving = 1.0 - sec / base.seconds[-1]
        rows.append(
            f"\nSALT first reached the baseline's final validation loss {target:.4f} at step "
            f"{step} of {base.steps[-1]} ({step / base.steps[-1]:.0%} of the steps), after "
            f"{sec:.1f} s of training against the baseline's {base.seconds[-1]:.1f} s: "
            f"a wall-clock saving of {saving:.0%} (teacher training not counted)."
        )
    table = "\n".join(rows)
    (out / "results.md").write_text(table + "\n")
    return table


def plot(base: Curve, salt: Curve, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for curve, label in ((base, "baseline"), (salt, "SALT")):
        axes[0].plot(curve.steps, curve.losses, marker="o", ms=3, label=label)
        axes[1].plot(curve.seconds, curve.losses, marker="o", ms=3, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (integration test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "demo")
    parser.add_argument("--salt-args", default="", help="extra flags for the SALT student only, "
                        "e.g. \"--kd-weight 0.5 --kd-steps 200\"")  # fmt: skip
    args = parser.parse_args()
    out = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    print("== data: stdlib docstring corpus, tokenizer, indexed dataset", flush=True)
    paths = prepare_demo_data(args.cache)
    data = ["--data-path", paths.data_prefix, "--tokenizer-model", paths.tokenizer_model,
            "--data-cache-path", str(args.cache / "index")]  # fmt: skip
    quick_t = QUICK["teacher"] if args.quick else []
    quick_s = QUICK["student"] if args.quick else []
    teacher_dir = out / "teacher" / "ckpt"
    teacher = train(
        "teacher", "demo_teacher.yaml", [*quick_t, "--save", str(teacher_dir)], out, data
    )
    base = train("baseline", "demo_student.yaml", [*quick_s, "--kd-steps", "0"], out, data)
    salt_extra = [*quick_s, "--kd-teacher-load", str(teacher_dir), *shlex.split(args.salt_args)]
    salt = train("salt", "demo_student.yaml", salt_extra, out, data)
    table = report(base, salt, teacher, out)
    plot(base, salt, out / "val_loss.png")
    print("\n" + table)
    print(f"\nplot: {out / 'val_loss.png'} | TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
