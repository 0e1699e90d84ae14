"""Models built on a fake CUDA device (FakeTensorMode): every parameter must report ``cuda``.

Regression for "the teacher is never moved to the device": megatron puts its linear layers on the
GPU itself, but plain ``torch.nn`` modules (our norms, megatron's learned position embedding)
stay on the host, and the first teacher forward fails on a GPU. The teacher's forward on the
device is exercised in :mod:`tests.fake_device.test_meta_accelerator`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from tests.distributed.launcher import run_distributed
from tests.fake_device import harness
from tests.fake_device.checkpoints import FINGERPRINT, VOCAB, write_teacher_checkpoint

pytestmark = pytest.mark.fake_device

ARCH = ["--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm"]


def _student_cfg(root: str, tp: int, t: int) -> Any:
    from salt_megatron.config import parse_config

    return parse_config([
        "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "8",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--kd-teacher-load", root, "--kd-steps", "3",
        "--tensor-model-parallel-size", str(tp), "--teacher-tensor-model-parallel-size", str(t),
    ])  # fmt: skip


def _build_teacher(root: str, tp: int, t: int) -> Any:
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.parallel.state import reseed
    from salt_megatron.runtime import device
    from salt_megatron.teacher import Teacher

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    reseed(1234)
    padded = mcfg.padded_vocab_size(VOCAB, 8, tp)
    group, rank = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank()
    cfg = _student_cfg(root, tp, t)
    teacher = Teacher.build(cfg, group, rank, tp, True, padded, FINGERPRINT, device=device())
    return teacher, padded // tp


def _fake_cuda_builds(root: str) -> list[str]:
    """World 1, FakeTensorMode: student chunks and the teacher report cuda for every tensor."""
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.student import build_student_chunks

    harness.stub_checkpoint_load()
    with harness.fake_cuda():
        teacher, _ = _build_teacher(root, 1, 1)
        harness.assert_on_device(teacher.model, "cuda")
        cfg = _student_cfg(root, 1, 1)
        cfg.model.position_embedding_type = "learned_absolute"
        cfg.model.normalization = "LayerNorm"
        chunks = build_student_chunks(cfg, mcfg.student_transformer_config(cfg), 200)
        for chunk in chunks:
            harness.assert_on_device(chunk, "cuda")
    return [str(p.device) for p in teacher.model.parameters()][:1]


def test_models_are_built_on_the_fake_cuda_device(tmp_path: Any) -> None:
    root = write_teacher_checkpoint(str(tmp_path / "teacher"), *ARCH)
    setup = partial(harness.init_process, "fake")
    assert run_distributed(_fake_cuda_builds, 1, root, setup=setup) == [["cuda:0"]]
