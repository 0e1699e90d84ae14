"""The colocated teacher on gloo ranks: own groups, any-layout loading, student-layout logits.

One world-2 launch saves a teacher checkpoint at TP=2 (padded vocab 208) and records the saving
model's full-vocabulary logits as the reference; then it and one world-4 launch build teachers at
many (student TP, teacher TP, PP) layouts from that checkpoint and compare, check the KD loss
against the dense float64 reference, check that no rank ever holds more teacher logits than its
own vocabulary slice (peak bytes of vocabulary-wide tensors), and check release(). At PP = 2
every stage holds a body and only the last stage a head: the first stage's hidden states, sent
to the last stage, give the reference logits there.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, DIV, SEQ, BATCH = 200, 8, 16, 5  # padded 200 (TP1) / 208 (TP2) / 224 (TP4)
FINGERPRINT = "sha256:test-tokenizer"
TEACHER = [
    "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", str(DIV),
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--max-position-embeddings", "64", "--seq-length", "32",
]  # fmt: skip


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens_bs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens_bs, torch.arange(SEQ).expand(BATCH, SEQ).contiguous()


def _save_teacher(root: str) -> torch.Tensor:
    """Save a TP=2 teacher under ``root``; return its full logits ``[SEQ, BATCH, 208]``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    from salt_megatron.checkpoint import layout
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config import parse_config
    from salt_megatron.config.cli import to_dict
    from salt_megatron.models.gpt import build_gpt
    from salt_megatron.parallel.state import reseed

    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    reseed(1234)
    cfg = parse_config([*TEACHER, "--tensor-model-parallel-size", "2"])
    padded = mcfg.padded_vocab_size(VOCAB, DIV, 2)
    model = build_gpt(
        cfg.model, mcfg.transformer_config(cfg.model, tp=2), padded_vocab_size=padded,
        max_sequence_length=64, pre_process=True, post_process=True, init_seed=7,
    )  # fmt: skip
    model.eval()
    tokens_bs, pos_bs = _tokens()
    with torch.no_grad():
        shard_bsv = model(tokens_bs, pos_bs, attention_mask=None)
    parts = [torch.empty_like(shard_bsv) for _ in range(2)]
    dist.all_gather(parts, shard_bsv.contiguous(), group=mpu.get_tensor_model_parallel_group())
    full_sbv = torch.cat(parts, dim=-1).transpose(0, 1).contiguous()
    path = layout.iteration_dir(root, 5)
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    dist_checkpointing.save(layout.model_sharded_state_dict([model]), path)
    if dist.get_rank() == 0:
        meta = {"config": to_dict(cfg), "tokenizer_fingerprint": FINGERPRINT, "step": 5}
        layout.write_meta(path, {**meta, "padded_vocab_size": padded})
        with open(os.path.join(root, layout.TRACKER_FILE), "w") as f:
            f.write("5")
    dist.barrier()
    mpu.destroy_model_parallel()
    return full_sbv


class VocabWideBytes(TorchDispatchMode):
    """Peak bytes of live storages allocated inside the block for tensors whose last dimension is
    one of ``widths`` (vocabulary-wide: the full padded vocabulary, a teacher shard, a student
    slice). An op output aliasing one of its inputs (a view) is no allocation; storages are
    tracked by weak reference, so frees are counted."""

    def __init__(self, widths: set[int]) -> None:
        super().__init__()
        self.widths, self.peak = widths, 0
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_leaves((args, kwargs))
            if isinstance(x, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] in self.widths:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _check_layout(root: str, ref_sbv: torch.Tensor, tp: int, pp: int, t: int) -> dict[str, Any]:
    """Build a teacher at (student TP, PP, teacher TP); compare logits, KD loss; release it."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config import parse_config
    from salt_megatron.loss import kd_cross_entropy, reference_kd_loss
    from salt_megatron.parallel.state import reseed
    from salt_megatron.runtime import device
    from salt_megatron.teacher import PAD_LOGIT, Teacher

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    reseed(1234)
    cfg = parse_config([
        "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", str(DIV),
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--kd-teacher-load", root, "--kd-steps", "10",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--teacher-tensor-model-parallel-size", str(t),
    ])  # fmt: skip
    padded = mcfg.padded_vocab_size(VOCAB, DIV, tp)
    group, rank = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank()
    last = mpu.is_pipeline_last_stage()
    teacher = Teacher.build(cfg, group, rank, tp, last, padded, FINGERPRINT, device=device())
    out: dict[str, Any] = {"layout": (tp, pp, t), "head": teacher.head is not None}
    assert out["head"] == last
    received_bsh = _pipeline_hidden(teacher, *_tokens()) if pp > 1 else None
    if not last:
        with pytest.raises(RuntimeError, match="not built off the last pipeline stage"):
            teacher.logits_from_hidden(torch.zeros(BATCH, SEQ, 32))
        _check_release(teacher, out)
        mpu.destroy_model_parallel()
        return out
    width = padded // tp
    lo, hi = rank * width, (rank + 1) * width
    # Reference in the student's padded layout: true columns from the saved model, padding masked.
    want_sbv = torch.full((SEQ, BATCH, padded), PAD_LOGIT)
    want_sbv[..., :VOCAB] = ref_sbv[..., :VOCAB]
    tokens_bs, pos_bs = _tokens()
    errors, peaks = [], []
    for b in (BATCH, 1, 3):  # 5 splits unevenly; 1 and 3 leave replicas idle at 4 replicas
        with VocabWideBytes({padded, padded // t, width}) as bytes_:
            got_sbv = teacher.student_layout_logits(tokens_bs[:b], pos_bs[:b])
        assert got_sbv.shape == (SEQ, b, width) and not got_sbv.requires_grad
        errors.append((got_sbv - want_sbv[:, :b, lo:hi]).abs().max().item())
        peaks.append((bytes_.peak, SEQ * b * width * got_sbv.element_size()))
    if received_bsh is not None:  # the first stage's hidden states, through the last's head
        got_sbv = teacher.logits_from_hidden(received_bsh)
        errors.append((got_sbv - want_sbv[..., lo:hi]).abs().max().item())
    out["logits_err"] = max(errors)
    assert out["logits_err"] < 1e-5, out
    out["peak_logits_bytes"] = peaks
    assert all(peak == want for peak, want in peaks), (tp, t, peaks)

    g = torch.Generator().manual_seed(11)
    student_sbv = torch.randn(SEQ, BATCH, padded, generator=g, dtype=torch.float64) * 3
    labels_sb = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    teacher_sbv = teacher.student_layout_logits(tokens_bs, pos_bs)
    loss_sb = kd_cross_entropy(
        student_sbv[..., lo:hi].float().contiguous(), teacher_sbv, labels_sb, 0.6, 2.0,
        group if tp > 1 else None, t2_scaling=True,
    )  # fmt: skip
    dense = reference_kd_loss(student_sbv, want_sbv, labels_sb, 0.6, 2.0, t2_scaling=True)
    out["kd_err"] = (loss_sb.double() - dense["loss"]).abs().max().item()
    assert out["kd_err"] < 1e-4, out

    _check_release(teacher, out)
    mpu.destroy_model_parallel()
    return out


def _pipeline_hidden(teacher: Any, tokens_bs: torch.Tensor, pos_bs: torch.Tensor) -> Any:
    """Every stage computes the hidden states; the first sends its to the last, which returns
    what it received (None elsewhere)."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.parallel.teacher_pipeline import StagePeers, stage_blocks, wait_all

    hidden_bsh = teacher.final_hidden_states(tokens_bs, pos_bs)
    assert hidden_bsh.shape == (BATCH, SEQ, 32)
    stage = mpu.get_pipeline_model_parallel_rank()
    peers = StagePeers.of(mpu.get_pipeline_model_parallel_group(), stage)
    if peers.stage == 0:
        wait_all([peers.send_to_last(hidden_bsh)])
    if not peers.is_last:
        return None
    received_mbsh = teacher.empty_hidden(BATCH, SEQ).unsqueeze(0)
    wait_all(peers.receive_others(received_mbsh, [range(1), range(0)]))
    assert stage_blocks(1, 2) == [range(1), range(1, 1)]
    return received_mbsh[0]


def _check_release(teacher: Any, out: dict[str, Any]) -> None:
    """release() frees every parameter and buffer and destroys the teacher's groups."""
    import torch.distributed as dist

    refs = [weakref.ref(x) for m in (teacher.model, teacher.head) if m is not None
            for x in (*m.parameters(), *m.buffers())]  # fmt: skip
    groups = list(teacher.groups.owned)
    pg_map = dist.distributed_c10d._world.pg_map
    assert all(pg in pg_map for pg in groups)
    out["freed"] = teacher.release()
    gc.collect()
    assert out["freed"] > 0 and refs and all(r() is None for r in refs), out
    assert teacher.model is None and not any(pg in pg_map for pg in groups)


def _run(root: str, ref_sbv: torch.Tensor | None, layouts: list[tuple[int, int, int]]) -> Any:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    saved = _save_teacher(root) if ref_sbv is None else ref_sbv
    results = [_check_layout(root, saved, *lay) for lay in layouts]
    return saved, results


WORLD2 = [(2, 1, 1), (2, 1, 2), (1, 1, 1), (1, 2, 1)]  # (student TP, PP, teacher TP)
WORLD4 = [(4, 1, 1), (4, 1, 2), (4, 1, 4), (2, 1, 1), (2, 2, 2), (2, 2, 1)]


def test_teacher_layouts(tmp_path: Any) -> None:
    """World 2 saves at TP=2 and checks 4 layouts; world 4 checks 6 more from that checkpoint."""
    root = str(tmp_path / "teacher")
    results2 = run_distributed(_run, 2, root, None, WORLD2)
    ref_sbv = results2[0][0]
    assert ref_sbv.shape == (SEQ, BATCH, 208)
    results4 = run_distributed(_run, 4, root, ref_sbv, WORLD4)
    for per_rank in (results2, results4):
        for _, checks in per_rank:
            for check in checks:
                assert check["freed"] > 0, check
                if check["head"]:
                    assert check["logits_err"] < 1e-5 and check["kd_err"] < 1e-4, check
    # With PP=2 every stage holds a teacher body; only the last stage (rank 1 of world 2; ranks
    # 2, 3 of world 4) the head, which applies the first stage's hidden states exactly.
    assert [r[1][3]["head"] for r in results2] == [False, True]
    assert [r[1][4]["head"] for r in results4] == [False, False, True, True]
