"""The README's main job: SALT against a baseline at small scale, on 2 CPU processes.

1. the embedded corpus (stdlib docstrings), its tokenizer and indexed dataset (cached);
2. a small teacher, trained and saved by our own trainer;
3. a baseline student and a SALT student (KD from the teacher for the first ``kd_steps``), same
   steps and data order, student TP=2 with a TP=1 teacher;
4. SALT on stored targets: the same teacher's top-64 / top-p 0.95 targets of the KD phase's
   samples, stored once by ``tools/save_teacher_targets.py`` (timed as a one-off cost), then a
   third student trained on them with no teacher (``--kd-targets``);
5. a table: final validation loss of each, the step at which each SALT student first reaches the
   baseline's final validation loss and the training wall-clock to get there, without and with
   the one-off costs (teacher training, the targets pass); a PNG of validation loss against
   step and wall-clock; TensorBoard logs under ``runs/demo``; every student's final checkpoint in
   ``<out>/<run>/ckpt`` (what ``tools/downstream.py`` fine-tunes and evaluates).

    python tools/demo.py            # about 20 minutes on 2 idle cores
    python tools/demo.py --quick    # a couple of minutes (the integration test)
    python tools/demo.py --stored-only --logprob-format float16   # after a full run: only step 4
    python tools/demo.py --stored-only --targets DIR   # step 4 on an existing store, no pass
    python tools/demo.py --stored-only --logprob-format q8 --seed 2   # another student seed
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from salt_megatron.data.target_shards import LOGPROB_FORMATS  # noqa: E402
from tools.runs import (  # noqa: E402
    Curve,
    TargetsPass,
    demo_data_flags,
    existing_targets,
    plot,
    store_targets,
    train,
)

QUICK = {
    "teacher": ["--train-iters", "40", "--eval-interval", "20"],
    "student": ["--train-iters", "40", "--kd-steps", "16", "--eval-interval", "8",
                "--num-layers", "2", "--hidden-size", "128", "--log-interval", "4"],
}  # fmt: skip


def report(
    base: Curve,
    variants: dict[str, tuple[Curve, float]],
    teacher: Curve,
    tpass: TargetsPass,
    out: Path,
    filename: str = "results.md",
) -> str:
    """The results table (also written to ``out/filename``); ``variants`` maps a SALT run's name
    to (curve, one-off seconds)."""
    target = base.losses[-1]
    rows = [
        "| run | final val loss | train wall-clock (s) | step reaching the baseline's final "
        "loss | wall-clock to it (s) | with one-off teacher costs (s) |",
        "|---|---|---|---|---|---|",
        f"| teacher (trained once, reusable) | {teacher.losses[-1]:.4f} | "
        f"{teacher.seconds[-1]:.1f} | | | |",
        f"| teacher targets pass (once, reusable; {tpass.wall_s:.0f} s with start-up) | | "
        f"{tpass.seconds:.1f} | | | |",
        f"| baseline student | {target:.4f} | {base.seconds[-1]:.1f} | {base.steps[-1]} | "
        f"{base.seconds[-1]:.1f} | {base.seconds[-1]:.1f} |",
    ]
    notes = []
    for name, (curve, one_off) in variants.items():
        hit = curve.first_step_reaching(target)
        reach = ("not reached", "", "") if hit is None else (
            str(hit[0]), f"{hit[1]:.1f}", f"{hit[1] + one_off:.1f}")  # fmt: skip
        rows.append(f"| {name} | {curve.losses[-1]:.4f} | {curve.seconds[-1]:.1f} | "
                    f"{' | '.join(reach)} |")  # fmt: skip
        if hit is not None:
            notes.append(
                f"{name}: step {hit[0]} of {base.steps[-1]} ({hit[0] / base.steps[-1]:.0%} of "
                f"the steps), {1.0 - hit[1] / base.seconds[-1]:.0%} less training wall-clock "
                f"than the baseline ({1.0 - (hit[1] + one_off) / base.seconds[-1]:.0%} with the "
                "one-off teacher costs)."
            )
    notes.append(
        f"Stored targets: {tpass.ids_per_token:.2f} ids per token kept (k=64, p=0.95), "
        f"{tpass.bytes_per_token:.1f} bytes per token on disk."
    )
    table = "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    (out / filename).write_text(table + "\n")
    return table


def stored_only(
    out: Path,
    teacher_dir: Path,
    salt_args: list[str],
    data: list[str],
    fmt: str,
    targets: Path | None = None,
    seed: int | None = None,
) -> None:
    """Step 4 alone, on the teacher and baseline an earlier run left in ``out``: the targets
    in ``out/targets_<fmt>``, the student in ``out/salt_offline_<fmt>``, the table in
    ``out/results_<fmt>.md``. With ``targets``, no pass: the student trains on that existing
    store (e.g. a ``save_teacher_targets.py --convert`` copy), named by its directory. With
    ``seed``, the student has that seed (initial weights, data order, hence its own KD samples
    and targets) and the names of what it makes end in ``_seed<seed>``; its table still compares
    with the demo's baseline (the default seed): read its final loss against other students of
    that seed."""
    runs = {name: out / name / "metrics.jsonl" for name in ("teacher", "baseline")}
    missing = [str(p) for p in runs.values() if not p.is_file()]
    if missing or not teacher_dir.is_dir():
        raise SystemExit(f"--stored-only needs an earlier full run in {out} (missing: "
                         f"{', '.join(missing) or teacher_dir})")  # fmt: skip
    teacher, base = (Curve.read(p, 0.0) for p in runs.values())
    suffix = "" if seed is None else f"_seed{seed}"
    salt_args = salt_args if seed is None else [*salt_args, "--seed", str(seed)]
    if targets is None:
        targets, tag = out / f"targets_{fmt}{suffix}", fmt + suffix
        tpass = store_targets(teacher_dir, salt_args, targets, data, logprob_format=fmt)
    else:
        tag = targets.name
        tpass = existing_targets(targets)
    flags = [*salt_args, "--kd-targets", str(targets)]
    offline = train(f"salt_offline_{tag}", "demo_student.yaml", flags, out, data)
    name = f"SALT, stored targets, {tag} (no teacher in training)"
    variants = {name: (offline, teacher.seconds[-1] + tpass.seconds)}
    print("\n" + report(base, variants, teacher, tpass, out, f"results_{tag}.md"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (integration test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "demo")
    parser.add_argument("--salt-args", default="", help="extra flags for the SALT student only, "
                        "e.g. \"--kd-weight 0.5 --kd-steps 200\"")  # fmt: skip
    parser.add_argument(
        "--logprob-format",
        choices=LOGPROB_FORMATS,
        default="float16",
        help="how the stored targets keep log-probabilities (default float16)",
    )
    parser.add_argument("--targets", type=Path, default=None,
                        help="with --stored-only: train on this existing store instead of "
                             "making one")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None,
                        help="with --stored-only: the student's seed (own targets)")  # fmt: skip
    parser.add_argument("--stored-only", action="store_true",
                        help="reuse the teacher and baseline of an earlier run in --out; store "
                             "targets and train only the stored-target student")  # fmt: skip
    args = parser.parse_args()
    out = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    data = demo_data_flags(args.cache)
    quick_t = QUICK["teacher"] if args.quick else []
    quick_s = QUICK["student"] if args.quick else []
    teacher_dir = out / "teacher" / "ckpt"
    if args.stored_only:
        stored_only(out, teacher_dir, [*quick_s, *shlex.split(args.salt_args)], data,
                    args.logprob_format, args.targets, args.seed)  # fmt: skip
        return
    teacher = train(
        "teacher", "demo_teacher.yaml", [*quick_t, "--save", str(teacher_dir)], out, data
    )

    def save(name: str) -> list[str]:  # the students' final weights (tools/downstream.py)
        return ["--save", str(out / name / "ckpt")]

    base = train("baseline", "demo_student.yaml", [*quick_s, "--kd-steps", "0", *save("baseline")],
                 out, data)  # fmt: skip
    salt_args = [*quick_s, *shlex.split(args.salt_args)]
    online = ["--kd-teacher-load", str(teacher_dir)]
    salt = train("salt", "demo_student.yaml", [*salt_args, *online, *save("salt")], out, data)
    tpass = store_targets(teacher_dir, salt_args, out / "targets", data,
                          logprob_format=args.logprob_format)  # fmt: skip
    offline = train("salt_offline", "demo_student.yaml",
                    [*salt_args, "--kd-targets", str(out / "targets"), *save("salt_offline")],
                    out, data)  # fmt: skip
    one_off = teacher.seconds[-1]
    variants = {
        "SALT, online teacher (forward in every KD step)": (salt, one_off),
        "SALT, stored targets (no teacher in training)": (offline, one_off + tpass.seconds),
    }
    table = report(base, variants, teacher, tpass, out)
    plot({"baseline": base, "SALT (online)": salt, "SALT (stored targets)": offline},
         out / "val_loss.png")  # fmt: skip
    print("\n" + table)
    print(f"\nplot: {out / 'val_loss.png'} | TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
