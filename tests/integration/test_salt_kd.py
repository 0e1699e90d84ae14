"""SALT end to end: a teacher trained by our trainer, a TP=2 student distilling from it (teacher
TP=1), exact resume inside the KD phase and across the switch, and PP=2 against PP=1. The full KD
run also logs to Weights & Biases (offline), checked against its TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from salt_megatron.checkpoint import layout
from tests.integration.conftest import launch, read_metrics
from tests.wandb_files import offline_runs, read_offline_run

pytestmark = pytest.mark.integration

COMMON = [
    "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--log-interval", "1", "--split", "90,5,5", "--lr", "3e-3",
]  # fmt: skip
TEACHER = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
           "--train-iters", "6"]  # fmt: skip
STUDENT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
           "--train-iters", "12", "--kd-steps", "6", "--kd-weight", "0.5",
           "--kd-schedule", "linear", "--kd-temperature", "2", "--kd-t2-scaling"]  # fmt: skip


def _ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stdout[-5000:]
    return str(proc.stdout)


def _resume_from(src: Path, step: int, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(layout.iteration_dir(str(src), step), layout.iteration_dir(str(dst), step))
    layout.write_latest_step(str(dst), step)
    return dst


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher") / "ckpt"
    _ok(launch([*COMMON, *TEACHER, "--save", str(root)], nproc=1))
    return root


def test_kd_through_the_switch_and_exact_resume(teacher: Path, tmp_path: Path) -> None:
    kd = [*COMMON, *STUDENT, "--kd-teacher-load", str(teacher), "--tensor-model-parallel-size", "2"]
    full = tmp_path / "full"
    out = _ok(launch([*kd, "--save", str(full), "--save-interval", "4", "--keep-last", "3",
                      "--metrics-file", str(tmp_path / "full.jsonl"),
                      "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "salt-tests",
                      "--wandb-exp-name", "kd-full"], nproc=2,
                     env={"WANDB_MODE": "offline"}))  # fmt: skip
    assert "KD phase over, teacher released" in out
    _check_wandb_equals_tensorboard(full / "wandb", tmp_path / "tb")
    ref = read_metrics(tmp_path / "full.jsonl")
    assert sorted(ref) == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in ref.values())
    assert all(ref[s]["kd_weight"] > 0 and "kd_loss" in ref[s] for s in range(1, 7))
    assert all("kd_weight" not in ref[s] for s in range(7, 13))  # plain phase: no KD columns
    meta = json.loads((Path(layout.iteration_dir(str(full), 4)) / layout.META_FILE).read_text())
    assert meta["extra"]["phase"] == "kd"
    meta = json.loads((Path(layout.iteration_dir(str(full), 8)) / layout.META_FILE).read_text())
    assert meta["extra"]["phase"] == "plain"
    for step in (4, 8):  # inside the KD phase, and past the switch
        root = _resume_from(full, step, tmp_path / f"from{step}")
        metrics = tmp_path / f"from{step}.jsonl"
        _ok(launch([*kd, "--load", str(root), "--save", str(root), "--metrics-file",
                    str(metrics)], nproc=2))  # fmt: skip
        got = read_metrics(metrics)
        assert sorted(got) == list(range(step + 1, 13))
        for s in got:
            assert got[s]["loss"] == ref[s]["loss"], (step, s)  # bitwise on CPU


def _tensorboard_scalars(tb_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[tuple[str, int], float] = {}
    for events in tb_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out |= {(tag, e.step): e.value for e in acc.Scalars(tag)}
    return out


def _check_wandb_equals_tensorboard(wandb_root: Path, tb_dir: Path) -> None:
    """One W&B run (the logging rank's) with the run config and every TensorBoard scalar."""
    (run_dir,) = offline_runs(wandb_root)  # <--save>/wandb by default; 2 ranks, one run
    run = read_offline_run(run_dir)
    assert (run.name, run.project) == ("kd-full", "salt-tests")
    assert run.config["distill"]["kd_steps"] == 6 and run.config["parallel"][
        "tensor_model_parallel_size"] == 2  # fmt: skip
    got = {(k, step): v for step, row in run.history.items() for k, v in row.items()
           if not k.startswith("_")}  # fmt: skip
    tb = _tensorboard_scalars(tb_dir)
    assert set(got) == set(tb), sorted(set(got) ^ set(tb))
    for key, value in got.items():  # TensorBoard keeps float32
        assert struct.unpack("f", struct.pack("f", value))[0] == tb[key], key
    assert all(("train/kd_loss", s) in got for s in range(1, 7))
    assert not any(("train/kd_loss", s) in got for s in range(7, 13))
    assert ("kd/teacher_freed_mib", 6) in got


def test_student_layouts_with_teacher_match_world1(teacher: Path, tmp_path: Path) -> None:
    """PP=2 (1F1B), PP=2 x VPP=2 and TP=2 with sequence parallelism, all with a TP=1 teacher."""
    kd = [*COMMON, *STUDENT, "--kd-teacher-load", str(teacher), "--train-iters", "8",
          "--num-layers", "4"]  # fmt: skip
    layouts = {
        "world1": ([], 1),
        "pp2": (["--pipeline-model-parallel-size", "2"], 2),
        "pp2-vpp2": (["--pipeline-model-parallel-size", "2",
                      "--virtual-pipeline-model-parallel-size", "2"], 2),
        "tp2-sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),
    }  # fmt: skip
    runs = {}
    for name, (extra, nproc) in layouts.items():
        metrics = tmp_path / f"{name}.jsonl"
        _ok(launch([*kd, *extra, "--metrics-file", str(metrics)], nproc=nproc))
        runs[name] = read_metrics(metrics)
    ref = runs.pop("world1")
    # 8 Adam steps: tensor parallelism changes float32 reduction orders (row-parallel partial
    # sums), and Adam's normalisation amplifies the rounding; 1e-4 relative still catches any
    # wrong gradient (those differ at the first step by far more).
    assert sorted(ref) == list(range(1, 9))
    for name, got in runs.items():
        assert sorted(got) == list(range(1, 9)), name
        for s in range(1, 9):
            for key in ("loss", "grad_norm") + (("kd_loss", "top1_agree") if s <= 6 else ()):
                assert got[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-5), (name, s, key)


def _events_within(trace: Path, step: int) -> list[str]:
    """Names of the trace events inside the ``train_step <step>`` range of a Chrome trace."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    (outer,) = [e for e in events if e["name"] == f"train_step {step}"]
    begin, end = outer["ts"], outer["ts"] + outer["dur"]
    return [e["name"] for e in events if begin <= e["ts"] and e["ts"] + e["dur"] <= end]


def test_rampup_keeps_kd_in_steps_with_wsd_profile_and_memory(
    teacher: Path, tmp_path: Path
) -> None:
    """DP=2 with a batch ramp-up 2 -> 8 over 16 samples and WSD: the KD weight, the switch and
    the LR follow the step count while the batch grows; a profiled step holds its forward and
    backward; every rank's peak memory is logged."""
    metrics, traces = tmp_path / "m.jsonl", tmp_path / "traces"
    args = [*COMMON, *STUDENT, "--kd-teacher-load", str(teacher), "--micro-batch-size", "1",
            "--global-batch-size", "8", "--rampup-batch-size", "2", "2", "16",
            "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style",
            "linear", "--log-memory", "--profile", "--profile-step-start", "2",
            "--profile-step-end", "4", "--profile-ranks", "0", "1", "--profile-dir", str(traces),
            "--metrics-file", str(metrics)]  # fmt: skip
    out = _ok(launch(args, nproc=2))
    got = read_metrics(metrics)
    assert sorted(got) == list(range(1, 13))
    consumed, lr, min_lr = 0, 3e-3, 3e-5
    for s in range(1, 13):
        ramped = 8 if consumed > 16 else 2 + 2 * int(consumed / (16 / 3))
        assert got[s]["global_batch_size"] == ramped, s
        consumed += ramped
        anneal = max(s - 1 - 8, 0) / 4  # the last 4 of 12 steps
        expected_lr = min_lr + (lr - min_lr) * (1 - anneal)
        assert got[s]["lr"] == pytest.approx(expected_lr, rel=1e-6), s
        if s <= 6:
            assert got[s]["kd_weight"] == pytest.approx(0.5 * (1 - (s - 1) / 6)), s
        else:
            assert "kd_weight" not in got[s], s
    assert [got[s]["global_batch_size"] for s in range(1, 7)] == [2, 2, 2, 4, 4, 6]
    assert "step 6: KD phase over, teacher released" in out
    for rank in (0, 1):
        memory = read_metrics(metrics, group=f"memory/rank{rank}")
        assert sorted(memory) == list(range(1, 13))
        assert all(0 < r["peak_rss_mib"] < 1e5 for r in memory.values())
        for step in (3, 4):  # --profile-step-start 2 = the third step
            names = _events_within(traces / f"trace_rank{rank}_steps2-4.json", step)
            assert "forward_step" in names, (rank, step)
            assert any(n.startswith("autograd::engine::evaluate_function") for n in names)
    assert "peak_rss_mib" in out
