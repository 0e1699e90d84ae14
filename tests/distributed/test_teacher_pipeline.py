"""The teacher balanced over pipeline stages: KD training at PP 2 and PP 4 against PP 1.

Two launches. World 1 trains a teacher for one step and saves it (a real checkpoint), then runs
the reference: the student at PP 1 (teacher run in line, per micro-batch) for 3 steps, 2 of
them KD. World 4 runs the same student, weights and data at

* PP 4 (1F1B; 6 micro-batches: teacher blocks of 2, 2, 1, 1),
* PP 2 x DP 2 with the distributed optimizer (3 micro-batches: blocks 2, 1), then a save inside
  the KD phase (after step 1) and a resume from it,
* TP 2 x PP 2 x VPP 2 with sequence parallelism and a teacher at TP 1 (interleaved schedule;
  two teacher replicas per student TP group, one sequence each),

and checks: loss, LM loss, KD loss and grad norm of every step equal the reference (1e-5);
each stage ran the teacher body on exactly its block of micro-batches and only the last stage
applied the head; the resumed run equals the uninterrupted one bitwise; the teacher's release
freed every stage's copy and destroyed all its groups.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.test_parallel_equivalence import SEQ, VOCAB, PatternDataset

pytestmark = pytest.mark.distributed

FINGERPRINT = "sha256:teacher-pipeline-test"
COMMON = [
    "--mock-data", "--vocab-size", str(VOCAB), "--seq-length", str(SEQ),
    "--make-vocab-size-divisible-by", "8", "--micro-batch-size", "2", "--global-batch-size",
    "12", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
]  # fmt: skip
TEACHER = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
           "--init-method-std", "0.3",
           "--train-iters", "1"]  # fmt: skip
STUDENT = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
           "--train-iters", "3", "--kd-steps", "2", "--kd-weight", "0.6", "--kd-schedule",
           "linear", "--kd-temperature", "2"]  # fmt: skip
LAYOUTS = {
    "PP4": ["--pipeline-model-parallel-size", "4"],
    "PP2xDP2-distopt": ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
    "TP2xPP2xVPP2-SP-teacherTP1": [
        "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
    ],
}  # fmt: skip
RESUMED = "PP2xDP2-distopt"
FIELDS = ("loss", "lm_loss", "kd_loss", "grad_norm")


def _trainer(args: list[str]) -> Any:
    import torch.distributed as dist

    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config(args)
    cfg.validate_world(dist.get_world_size())
    return Trainer(cfg, (PatternDataset(), None), VOCAB, tokenizer_fingerprint=FINGERPRINT)


def _finish(trainer: Any) -> None:
    from megatron.core import parallel_state

    trainer.close()
    parallel_state.destroy_model_parallel()


def _checkpointer(trainer: Any) -> Any:
    from salt_megatron.checkpoint.manager import Checkpointer

    return Checkpointer(trainer, FINGERPRINT, lambda: trainer.kd.state(trainer.step), False)


def _record(history: list[Any]) -> list[dict[str, float]]:
    return [{k: getattr(r, k) for k in FIELDS} for r in history]


class _Counts:
    """Counts this rank's teacher body forwards (per micro-batch) and head applications."""

    def __init__(self, teacher: Any) -> None:
        self.body = self.head = 0
        body, head = teacher.final_hidden_states, teacher.logits_from_hidden

        def counted_body(*args: Any) -> Any:
            self.body += 1
            return body(*args)

        def counted_head(*args: Any) -> Any:
            self.head += 1
            return head(*args)

        teacher.final_hidden_states, teacher.logits_from_hidden = counted_body, counted_head


def _train_checked(args: list[str]) -> dict[str, Any]:
    """Train ``args`` step by step; count the teacher's work; check its release afterwards."""
    import torch.distributed as dist

    trainer = _trainer(args)
    history = [trainer.train_step()]
    teacher = trainer.kd.step_fn.teacher
    counts = _Counts(teacher)
    history.append(trainer.train_step())  # the second KD step, counted
    refs = [weakref.ref(t) for m in (teacher.model, teacher.head) if m is not None
            for t in (*m.parameters(), *m.buffers())]  # fmt: skip
    groups = list(teacher.groups.owned)
    del teacher
    history.append(trainer.train_step())  # the teacher is released first: a plain step
    gc.collect()
    pg_map = dist.distributed_c10d._world.pg_map
    out = {
        "steps": _record(history),
        "kd": [r.kd_phase for r in history],
        "stage": trainer.layout.pp_rank,
        "n_micro": trainer.num_microbatches,
        "body": counts.body,
        "head": counts.head,
        "freed": trainer.kd.released_bytes,
        "alive": sum(r() is not None for r in refs),
        "groups_left": sum(g in pg_map for g in groups),
        "groups": len(groups),
    }
    _finish(trainer)
    return out


def _resume(args: list[str], root: str) -> list[dict[str, float]]:
    """Save after step 1 (KD phase), then a new trainer loads it and trains steps 2 and 3."""
    first = _trainer([*args, "--save", root])
    first.train_step()
    _checkpointer(first).save()
    _finish(first)
    second = _trainer([*args, "--load", root])
    assert _checkpointer(second).resume() == 1
    history = [second.train_step(), second.train_step()]
    _finish(second)
    return _record(history)


def _reference(root: str) -> list[dict[str, float]]:
    """World 1: train and save the teacher; the PP 1 KD run from it."""
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    teacher = _trainer([*COMMON, *TEACHER, "--save", root])
    teacher.train()
    _checkpointer(teacher).save()
    _finish(teacher)
    trainer = _trainer([*COMMON, *STUDENT, "--kd-teacher-load", root])
    history = trainer.train()
    _finish(trainer)
    return _record(history)


def _world4(root: str, tmp: str) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    student = [*COMMON, *STUDENT, "--kd-teacher-load", root]
    runs = {name: _train_checked([*student, *extra]) for name, extra in LAYOUTS.items()}
    resumed = _resume([*student, *LAYOUTS[RESUMED]], os.path.join(tmp, "student"))
    return {"runs": runs, "resumed": resumed}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("teacher_pipeline")
    root = str(tmp / "teacher")
    (reference,) = run_distributed(_reference, 1, root)
    return reference, run_distributed(_world4, 4, root, str(tmp))


def _close(got: dict[str, float], want: dict[str, float], where: Any) -> None:
    for key in FIELDS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (where, key)


def test_pipelined_teacher_matches_pp1(results: tuple[Any, list[dict[str, Any]]]) -> None:
    reference, ranks = results
    assert reference[0]["kd_loss"] > 0 and reference[2]["kd_loss"] == 0
    for rank, result in enumerate(ranks):
        for name, run in result["runs"].items():
            assert run["kd"] == [True, True, False], name
            for step, (got, want) in enumerate(zip(run["steps"], reference, strict=True), 1):
                _close(got, want, (name, rank, step))


def test_each_stage_runs_its_block_and_only_the_last_the_head(
    results: tuple[Any, list[dict[str, Any]]],
) -> None:
    from salt_megatron.parallel.teacher_pipeline import stage_blocks

    _, ranks = results
    stages = {"PP4": 4, "PP2xDP2-distopt": 2, "TP2xPP2xVPP2-SP-teacherTP1": 2}
    for name, p in stages.items():
        for result in ranks:
            run = result["runs"][name]
            blocks = stage_blocks(run["n_micro"], p)
            assert run["body"] == len(blocks[run["stage"]]), (name, run)
            assert run["head"] == (run["n_micro"] if run["stage"] == p - 1 else 0), (name, run)
    assert [len(b) for b in stage_blocks(6, 4)] == [2, 2, 1, 1]


def test_release_frees_every_stage(results: tuple[Any, list[dict[str, Any]]]) -> None:
    _, ranks = results
    for result in ranks:
        for name, run in result["runs"].items():
            assert run["freed"] > 0 and run["alive"] == 0, (name, run)
            assert run["groups"] > 0 and run["groups_left"] == 0, (name, run)


def test_resume_inside_the_kd_phase_is_exact(results: tuple[Any, list[dict[str, Any]]]) -> None:
    _, ranks = results
    for result in ranks:
        assert result["resumed"] == result["runs"][RESUMED]["steps"][1:]
