"""Teacher checks, FP8 error paths and the logits-layout arithmetic (no process group needed)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch

from salt_megatron.checkpoint import layout
from salt_megatron.config import parse_config
from salt_megatron.config.cli import to_dict
from salt_megatron.config.schema import ConfigError
from salt_megatron.models.fp8 import FP8Unavailable, check_fp8
from salt_megatron.parallel import teacher_exchange as tx
from salt_megatron.teacher import PAD_LOGIT, Teacher, TeacherError
from salt_megatron.teacher.checks import (
    check_compatible,
    resolve_checkpoint,
    teacher_model_config,
)

STUDENT = ["--mock-data", "--vocab-size", "200", "--seq-length", "32"]
TEACHER = [*STUDENT, "--num-layers", "2", "--hidden-size", "32", "--max-position-embeddings", "64"]


def _fake_checkpoint(root: Any, meta: dict[str, Any] | None = None, step: int = 3) -> str:
    """A checkpoint directory with every file the checks look for (no real weights)."""
    path = layout.iteration_dir(str(root), step)
    os.makedirs(path)
    for name in ("metadata.json", ".metadata"):
        with open(os.path.join(path, name), "w") as f:
            f.write("{}")
    default = {"config": to_dict(parse_config(TEACHER)), "tokenizer_fingerprint": "fp"}
    layout.write_meta(path, default if meta is None else meta)
    with open(os.path.join(str(root), layout.TRACKER_FILE), "w") as f:
        f.write(str(step))
    return path


def _student(root: Any, *extra: str) -> Any:
    return parse_config([*STUDENT, "--kd-teacher-load", str(root), "--kd-steps", "5", *extra])


def test_complete_checkpoint_resolves_and_gives_the_saved_shape(tmp_path: Any) -> None:
    path = _fake_checkpoint(tmp_path)
    ckpt = resolve_checkpoint(str(tmp_path))
    assert (ckpt.step, ckpt.path) == (3, path)
    model = teacher_model_config(ckpt, _student(tmp_path, "--hidden-dropout", "0.1"))
    assert (model.num_layers, model.hidden_size, model.max_position_embeddings) == (2, 32, 64)
    assert model.hidden_dropout == 0.0 and model.attention_dropout == 0.0
    check_compatible(ckpt, model, _student(tmp_path), "fp", 200)  # no error


@pytest.mark.parametrize(
    "remove, message",
    [
        ("root", "no such directory"),
        (layout.TRACKER_FILE, "no latest_checkpointed_iteration.txt"),
        ("iter", "is missing"),
        ("metadata.json", "metadata.json is missing"),
        (".metadata", ".metadata is missing"),
        (layout.META_FILE, "salt_meta.json is missing"),
    ],
)
def test_incomplete_checkpoint_is_a_clear_error(tmp_path: Any, remove: str, message: str) -> None:
    root = tmp_path / "t"
    root.mkdir()
    path = _fake_checkpoint(root)
    target = {"root": str(root), "iter": path, layout.TRACKER_FILE: str(root)}.get(remove, path)
    name = "" if remove in ("root", "iter") else remove
    victim = os.path.join(target, name) if name else target
    if os.path.isdir(victim):
        shutil.rmtree(victim)
    else:
        os.remove(victim)
    with pytest.raises(TeacherError, match="--kd-teacher-load") as err:
        resolve_checkpoint(str(root))
    assert message in str(err.value)


def test_unset_path_is_an_error() -> None:
    with pytest.raises(TeacherError, match="--kd-teacher-load is not set"):
        resolve_checkpoint(None)


def test_tokenizer_and_vocab_must_match(tmp_path: Any) -> None:
    _fake_checkpoint(tmp_path)
    ckpt = resolve_checkpoint(str(tmp_path))
    cfg = _student(tmp_path)
    model = teacher_model_config(ckpt, cfg)
    with pytest.raises(TeacherError, match="share one tokenizer"):
        check_compatible(ckpt, model, cfg, "other-fp", 200)
    with pytest.raises(TeacherError, match=r"teacher vocabulary 200 .* the student's 256"):
        check_compatible(ckpt, model, cfg, "fp", 256)


def test_sequence_length_must_be_covered(tmp_path: Any) -> None:
    _fake_checkpoint(tmp_path)  # max positions 64, trained at seq 32
    ckpt = resolve_checkpoint(str(tmp_path))
    long_cfg = _student(tmp_path, "--seq-length", "128")
    model = teacher_model_config(ckpt, long_cfg)
    with pytest.raises(TeacherError, match="--seq-length 128 exceeds the teacher's max_position"):
        check_compatible(ckpt, model, long_cfg, "fp", 200)
    cfg48 = _student(tmp_path, "--seq-length", "48")
    with pytest.raises(TeacherError, match="training sequence length 32"):
        check_compatible(ckpt, model, cfg48, "fp", 200)


def test_teacher_flags_only_without_a_saved_config(tmp_path: Any) -> None:
    _fake_checkpoint(tmp_path / "a")
    ckpt = resolve_checkpoint(str(tmp_path / "a"))
    with pytest.raises(TeacherError, match="--teacher-num-layers 6 disagrees"):
        teacher_model_config(ckpt, _student(tmp_path, "--teacher-num-layers", "6"))
    agreeing = teacher_model_config(ckpt, _student(tmp_path, "--teacher-num-layers", "2"))
    assert agreeing.num_layers == 2
    _fake_checkpoint(tmp_path / "b", meta={"tokenizer_fingerprint": "fp"})
    bare = resolve_checkpoint(str(tmp_path / "b"))
    assert (
        teacher_model_config(bare, _student(tmp_path, "--teacher-num-layers", "6")).num_layers == 6
    )


def test_build_fails_before_any_collective(tmp_path: Any) -> None:
    """Teacher.build raises TeacherError from the checks without a process group."""
    cfg = _student(tmp_path / "missing")
    with pytest.raises(TeacherError, match="no such directory"):
        Teacher.build(cfg, None, 0, 1, True, 200, "fp", device=torch.device("cpu"))
    cfg2 = parse_config([*STUDENT, "--tensor-model-parallel-size", "2", "--kd-teacher-load", "x"])
    with pytest.raises(TeacherError, match="padded vocabulary 201 is not divisible"):
        Teacher.build(cfg2, None, 0, 2, True, 201, "fp", device=torch.device("cpu"))


def test_fp8_flags_are_validated() -> None:
    cfg = parse_config([*STUDENT, "--fp8-format", "hybrid", "--transformer-impl",
                        "transformer_engine", "--fp8-recipe", "mxfp8"])  # fmt: skip
    assert (cfg.training.fp8_format, cfg.training.fp8_recipe) == ("hybrid", "mxfp8")
    with pytest.raises(ConfigError, match="--fp8-format e4m3 needs --transformer-impl"):
        parse_config([*STUDENT, "--fp8-format", "e4m3"])
    with pytest.raises(ConfigError, match="fp8-recipe"):
        parse_config([*STUDENT, "--fp8-recipe", "fp4"])


def test_fp8_without_transformer_engine_is_a_clear_error() -> None:
    check_fp8(None, "delayed")  # FP8 off: nothing to check
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        with pytest.raises(FP8Unavailable, match="needs Transformer Engine"):
            check_fp8("e4m3", "delayed")
    else:  # pragma: no cover - TE installed: either a GPU runs it or the error names the recipe
        if not torch.cuda.is_available():
            with pytest.raises(FP8Unavailable, match="needs a CUDA GPU"):
                check_fp8("e4m3", "delayed")
    with pytest.raises(FP8Unavailable, match="--fp8-recipe 'fp4'"):
        check_fp8("e4m3", "fp4")


def test_fp8_reaches_megatron_config() -> None:
    from salt_megatron.config import megatron as mcfg

    cfg = parse_config([*STUDENT, "--fp8-format", "e4m3", "--transformer-impl",
                        "transformer_engine", "--fp8-recipe", "tensorwise"])  # fmt: skip
    student = mcfg.student_transformer_config(cfg)
    assert (student.fp8, student.fp8_recipe, student.fp8_param) == ("e4m3", "tensorwise", False)
    teacher = mcfg.teacher_transformer_config(cfg, cfg.teacher)
    assert (teacher.fp8, teacher.fp8_param, teacher.tp_only_amax_red) == ("e4m3", True, True)
    plain = mcfg.teacher_transformer_config(parse_config(STUDENT), cfg.teacher)
    assert plain.fp8 is None and not plain.fp8_param


@pytest.mark.parametrize("s, t", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (8, 2), (8, 4)])
@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_replicas_split_every_micro_batch_once(s: int, t: int, batch: int) -> None:
    """The teacher replicas of a student TP group compute each sequence exactly once."""
    k = s // t
    covered: list[int] = []
    for i in range(k):  # rank i*t of each replica
        rows = tx.VocabLayout(s, t, i * t).rows(batch)
        covered += range(rows.start, rows.stop)
        for j in range(t):  # every rank of a replica computes the same rows
            assert tx.VocabLayout(s, t, i * t + j).rows(batch) == rows
    assert covered == list(range(batch))


def test_batch_chunks() -> None:
    assert tx.batch_chunks(5, 4) == [2, 1, 1, 1] and tx.batch_chunks(2, 4) == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="must divide"):
        tx.VocabLayout(4, 3, 0)


def test_padding_mask() -> None:
    got = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    masked = tx.mask_padded_vocab(got.clone(), vocab_start=6, true_vocab=7, fill=PAD_LOGIT)
    assert (masked[..., 0] == got[..., 0]).all() and (masked[..., 1:] == PAD_LOGIT).all()
    untouched = tx.mask_padded_vocab(got.clone(), vocab_start=0, true_vocab=7, fill=PAD_LOGIT)
    torch.testing.assert_close(untouched, got)
    all_pad = tx.mask_padded_vocab(got.clone(), vocab_start=9, true_vocab=7, fill=PAD_LOGIT)
    assert (all_pad == PAD_LOGIT).all()


def test_pad_logit_gives_zero_mass_without_nan() -> None:
    """A shard made only of padding must not produce NaN (-inf would)."""
    from salt_megatron.loss import kd_cross_entropy, reference_kd_loss

    g = torch.Generator().manual_seed(0)
    s_nv, t_nv = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y_n = torch.randint(0, 7, (6,), generator=g)
    t_nv[:, 7:] = PAD_LOGIT
    for temp in (0.5, 1.0, 3.0):
        got = kd_cross_entropy(s_nv, t_nv, y_n, 0.5, temp)
        ref = reference_kd_loss(s_nv, t_nv, y_n, 0.5, temp)["loss"]
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    only_pad = kd_cross_entropy(s_nv, torch.full_like(t_nv, PAD_LOGIT), y_n, 0.5, 0.5)
    assert torch.isfinite(only_pad).all()
