"""End-to-end checkpoints: exact resume, layout changes, preemption, corrupt checkpoints.

Every run trains the same tiny GPT on mock data for 20 steps (4 sequences of 32 tokens a step);
per-step losses come from ``--metrics-file``. Same-layout resumes must match the uninterrupted run
bitwise; resumes at another layout within 1e-5 (float reduction order changes).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from salt_megatron.checkpoint import layout
from tests.integration.conftest import launch, read_metrics, start

pytestmark = pytest.mark.integration

TINY = [
    "--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "20", "--log-interval", "1", "--split", "90,5,5",
]  # fmt: skip
TP2 = ["--tensor-model-parallel-size", "2"]
PP2_DISTOPT = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]


def _ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return str(proc.stdout)


def _losses(path: Path) -> dict[int, float]:
    return {step: rec["loss"] for step, rec in read_metrics(path).items()}


def _copy(src_root: Path, steps: list[int], dst_root: Path) -> Path:
    """A checkpoint root holding ``steps`` of ``src_root``, its tracker on the last one."""
    dst_root.mkdir(parents=True)
    for step in steps:
        shutil.copytree(
            layout.iteration_dir(str(src_root), step), layout.iteration_dir(str(dst_root), step)
        )
    layout.write_latest_step(str(dst_root), steps[-1])
    return dst_root


def _assert_same(got: dict[int, float], ref: dict[int, float], steps: range, tol: float) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        if tol == 0.0:
            assert got[step] == ref[step], (step, got[step], ref[step])
        else:
            assert abs(got[step] - ref[step]) <= tol, (step, got[step], ref[step])


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float], str]:
    """20 uninterrupted steps at TP=2, saving every 5 (keeping 3), validating every 10."""
    root = tmp_path_factory.mktemp("tp2") / "ckpt"
    args = [
        *TINY,
        *TP2,
        "--save",
        str(root),
        "--save-interval",
        "5",
        "--keep-last",
        "3",
        "--eval-interval",
        "10",
        "--eval-iters",
        "2",
        "--metrics-file",
        str(root / "m.jsonl"),
    ]
    out = _ok(launch(args, nproc=2))
    return root, _losses(root / "m.jsonl"), out


def test_full_run_saves_keeps_last_and_evaluates(
    tp2_run: tuple[Path, dict[int, float], str],
) -> None:
    root, losses, out = tp2_run
    assert sorted(losses) == list(range(1, 21))
    assert layout.saved_steps(str(root)) == [10, 15, 20]  # step 5 pruned by --keep-last 3
    assert layout.read_latest_step(str(root)) == 20
    assert not list(root.glob("*.tmp"))
    assert "step 10/20 | val_loss" in out and "step 20/20 | val_loss" in out
    assert "test loss" in out
    valid = read_metrics(root / "m.jsonl", group="valid")
    assert sorted(valid) == [10, 20] and all(r["loss"] > 0 for r in valid.values())
    meta = layout.read_meta(layout.iteration_dir(str(root), 20))
    assert (meta["step"], meta["consumed_samples"], meta["skipped_steps"]) == (20, 80, 0)
    assert meta["tokens_seen"] == 20 * 4 * 32
    assert meta["config"]["model"]["hidden_size"] == 32 and meta["padded_vocab_size"] == 256
    assert meta["layout"]["tp"] == 2 and "tokenizer_fingerprint" in meta


def _signal_workers(proc: Any, signum: int) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        if any("pretrain_salt.py" in part for part in child.cmdline()):
            child.send_signal(signum)


def test_sigterm_then_resume_is_bitwise(
    tp2_run: tuple[Path, dict[int, float], str], tmp_path: Path
) -> None:
    """Resume at step 10 (TP=2), SIGTERM every rank mid-run, resume again: all 20 losses exact."""
    ref_root, ref, _ = tp2_run
    root = _copy(ref_root, [10], tmp_path / "ckpt")
    metrics = root / "m.jsonl"
    args = [*TINY, *TP2, "--load", str(root), "--save", str(root), "--metrics-file", str(metrics)]
    proc = start(args, nproc=2)
    deadline = time.monotonic() + 150
    while not read_metrics(metrics) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_workers(proc, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    stopped = layout.read_latest_step(str(root))
    assert stopped is not None and 11 <= stopped < 20, f"signal not handled mid-run: {stopped}"
    assert f"exiting early: received SIGTERM; checkpoint at step {stopped}" in out
    _assert_same(_losses(metrics), ref, range(11, stopped + 1), 0.0)
    meta = layout.read_meta(layout.iteration_dir(str(root), stopped))
    assert meta["consumed_samples"] == 4 * stopped

    metrics.unlink()
    _ok(launch(args, nproc=2))
    _assert_same(_losses(metrics), ref, range(stopped + 1, 21), 0.0)


def test_resume_at_tp1_missing_shard_and_fallback(
    tp2_run: tuple[Path, dict[int, float], str], tmp_path: Path
) -> None:
    """Newest checkpoint lacks a shard: a clear error; --fallback-to-previous resumes at TP=1."""
    ref_root, ref, _ = tp2_run
    root = _copy(ref_root, [10, 15], tmp_path / "ckpt")
    (Path(layout.iteration_dir(str(root), 15)) / "__1_0.distcp").unlink()
    args = [*TINY, "--load", str(root), "--metrics-file", str(tmp_path / "m.jsonl")]
    failed = launch(args, nproc=1)
    assert failed.returncode == 3, failed.stdout[-4000:]
    assert "shard file __1_0.distcp is missing" in failed.stdout
    assert "--fallback-to-previous would try iter_0000010" in failed.stdout
    assert not read_metrics(tmp_path / "m.jsonl")  # failed before the first step

    out = _ok(launch([*args, "--fallback-to-previous"], nproc=1))
    assert "falling back to" in out and "iter_0000010" in out
    _assert_same(_losses(tmp_path / "m.jsonl"), ref, range(11, 21), 1e-5)


def test_resume_at_pp2_with_exit_interval(
    tp2_run: tuple[Path, dict[int, float], str], tmp_path: Path
) -> None:
    """TP=2 checkpoint resumed at PP=2; --exit-interval 15 saves step 15 and exits 0."""
    ref_root, ref, _ = tp2_run
    root = _copy(ref_root, [10], tmp_path / "ckpt")
    args = [
        *TINY,
        "--pipeline-model-parallel-size",
        "2",
        "--load",
        str(root),
        "--save",
        str(root),
        "--exit-interval",
        "15",
        "--metrics-file",
        str(root / "m.jsonl"),
    ]
    out = _ok(launch(args, nproc=2))
    assert "exiting early: --exit-interval 15 reached at step 15" in out
    assert layout.read_latest_step(str(root)) == 15
    _assert_same(_losses(root / "m.jsonl"), ref, range(11, 16), 1e-5)


@pytest.fixture(scope="module")
def distopt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    """20 steps at PP=2 with the distributed optimizer, saving every 5 (dp_reshardable, sync)."""
    root = tmp_path_factory.mktemp("distopt") / "ckpt"
    args = [*TINY, *PP2_DISTOPT, "--save", str(root), "--save-interval", "5", "--keep-last", "4"]
    _ok(launch([*args, "--metrics-file", str(root / "m.jsonl")], nproc=2))
    return root, _losses(root / "m.jsonl")


def test_distributed_optimizer_pp2_bitwise_and_dp2(
    distopt_run: tuple[Path, dict[int, float]], tmp_path: Path
) -> None:
    """dp_reshardable resumes exactly at PP=2 and refuses PP=1 in one line; a
    --ckpt-fully-reshardable save of the same run resumes at DP=2."""
    ref_root, ref = distopt_run
    root = _copy(ref_root, [10], tmp_path / "pp2")
    args = [*TINY, *PP2_DISTOPT, "--load", str(root), "--save", str(root), "--exit-interval", "15"]
    _ok(launch([*args, "--ckpt-fully-reshardable", "--metrics-file", str(root / "m.jsonl")], 2))
    _assert_same(_losses(root / "m.jsonl"), ref, range(11, 16), 0.0)
    assert layout.read_meta(layout.iteration_dir(str(root), 15))["optimizer_sharding"] == (
        "fully_reshardable"
    )

    dp2 = [*TINY, "--use-distributed-optimizer", "--metrics-file", str(tmp_path / "dp2.jsonl")]
    _ok(launch([*dp2, "--load", str(root)], nproc=2))  # iter 15, fully_reshardable
    _assert_same(_losses(tmp_path / "dp2.jsonl"), ref, range(16, 21), 1e-5)

    refused = _copy(ref_root, [10], tmp_path / "refused")
    failed = launch([*TINY, "--use-distributed-optimizer", "--load", str(refused)], nproc=1)
    assert failed.returncode == 3, failed.stdout[-3000:]
    errors = [line for line in failed.stdout.splitlines() if "checkpoint error" in line]
    assert errors == [
        f"pretrain_salt.py: checkpoint error: {layout.iteration_dir(str(refused), 10)}: its "
        "distributed-optimizer state is dp_reshardable, which cannot change layout (PP 2 -> 1); "
        "resave it at its own layout with --ckpt-fully-reshardable"
    ]


def _tensors(ckpt_dir: Path) -> dict[str, Any]:
    """Every tensor of a dist checkpoint (read in this process) and its common.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    state["common.pt"] = torch.load(ckpt_dir / "common.pt", weights_only=True)
    return state


def _rank_process(torchrun: Any, rank: int) -> psutil.Process:
    for child in psutil.Process(torchrun.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under torchrun {torchrun.pid}")


def test_async_save_equals_sync_and_survives_sigkill(
    distopt_run: tuple[Path, dict[int, float]], tmp_path: Path
) -> None:
    """--async-save: a rank SIGKILLed while iter_10 is being written leaves iter_5 the latest
    checkpoint, equal to the synchronous save of the same step; --load resumes from it exactly."""
    ref_root, ref = distopt_run
    root = tmp_path / "ckpt"
    args = [*TINY, *PP2_DISTOPT, "--save", str(root), "--load", str(root), "--async-save"]
    args += ["--save-interval", "5", "--metrics-file", str(root / "m.jsonl")]
    proc = start(args, nproc=2)
    writing = Path(layout.tmp_dir(str(root), 10))
    deadline = time.monotonic() + 150
    while not list(writing.glob("*.distcp")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the save of step 10 never started"
        time.sleep(0.005)
    _rank_process(proc, 1).kill()
    out, _ = proc.communicate(timeout=120)  # torchrun tears the job down, nothing hangs
    assert proc.returncode != 0, out[-3000:]
    assert layout.read_latest_step(str(root)) == 5, out[-3000:]
    assert writing.is_dir() and not Path(layout.iteration_dir(str(root), 10)).exists()

    async_state = _tensors(Path(layout.iteration_dir(str(root), 5)))
    sync_state = _tensors(Path(layout.iteration_dir(str(ref_root), 5)))
    assert sorted(async_state) == sorted(sync_state)
    for key, value in sync_state.items():
        if key != "common.pt":
            assert torch.equal(async_state[key], value), key
    assert async_state["common.pt"] == sync_state["common.pt"]

    (root / "m.jsonl").unlink()
    out = _ok(launch(args, nproc=2))
    assert f"resumed from {layout.iteration_dir(str(root), 5)}: step 5" in out
    _assert_same(_losses(root / "m.jsonl"), ref, range(6, 21), 0.0)
    assert layout.read_latest_step(str(root)) == 20 and not list(root.glob("*.tmp"))


def test_corrupt_metadata_and_mismatched_model(
    tp2_run: tuple[Path, dict[int, float], str], tmp_path: Path
) -> None:
    """A garbled .metadata and a different --hidden-size: exit 3 with a message naming each."""
    ref_root, _, _ = tp2_run
    root = _copy(ref_root, [10], tmp_path / "corrupt")
    (Path(layout.iteration_dir(str(root), 10)) / ".metadata").write_bytes(b"\x80\x04garbage")
    failed = launch([*TINY, "--load", str(root)], nproc=1)
    assert failed.returncode == 3, failed.stdout[-4000:]
    assert "corrupt torch-distributed metadata" in failed.stdout and ".metadata" in failed.stdout

    root = _copy(ref_root, [10], tmp_path / "mismatch")
    args = [*TINY, "--load", str(root)]
    args[args.index("--hidden-size") + 1] = "64"
    failed = launch(args, nproc=1)
    assert failed.returncode == 3, failed.stdout[-4000:]
    assert "--hidden-size 64 (checkpoint: 32)" in failed.stdout


def test_nonfinite_halt_is_clean_and_skip_count_saved(tmp_path: Path) -> None:
    """A huge LR makes step 2 non-finite (skipped, saved) and step 3 halts with exit code 4."""
    root = tmp_path / "ckpt"
    args = [
        *TINY,
        "--lr",
        "1e30",
        "--min-lr",
        "0",
        "--clip-grad",
        "0",
        "--skip-nonfinite-steps",
        "1",
        "--save",
        str(root),
        "--save-interval",
        "2",
    ]
    failed = launch(args, nproc=1)
    assert failed.returncode == 4, failed.stdout[-4000:]
    assert "training halted: non-finite" in failed.stdout and "at step 3" in failed.stdout
    assert "Traceback" not in failed.stdout
    meta = json.loads((Path(layout.iteration_dir(str(root), 2)) / layout.META_FILE).read_text())
    assert meta["skipped_steps"] == 1
