"""The colocated, frozen teacher: its own process groups, any-layout loading, student-layout logits.

Lifecycle (design and trade-offs in ``docs/teacher.md``)::

    teacher = Teacher.build(cfg, ...)          # every rank (collective); None off the last stage
    logits_sbv = teacher.student_layout_logits(tokens_bs, position_ids_bs)   # per micro-batch
    freed = teacher.release()                   # end of the KD phase, every teacher rank
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from salt_megatron.checkpoint.untrusted import load_weights
from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import SaltConfig
from salt_megatron.models.fp8 import check_fp8
from salt_megatron.models.gpt import build_gpt
from salt_megatron.parallel import logits_exchange as lx
from salt_megatron.parallel.teacher_groups import TeacherGroups, build_teacher_groups
from salt_megatron.teacher.checks import (
    TeacherCheckpoint,
    TeacherError,
    check_compatible,
    resolve_checkpoint,
    teacher_model_config,
)

log = logging.getLogger(__name__)

PAD_LOGIT = -1e30
"""Teacher logit of padded vocabulary columns (``v >= true vocab``): ``softmax`` gives them
exactly 0 in float32/bf16. Not ``-inf``: a shard made only of padding would then have a local
maximum of ``-inf`` and the loss's ``exp(t - max)`` would be NaN."""


def _check_layout(t: int, s: int, padded_vocab: int) -> None:
    if s % t:
        raise TeacherError(
            f"--teacher-tensor-model-parallel-size {t} must divide --tensor-model-parallel-size {s}"
        )
    if padded_vocab % s:
        raise TeacherError(f"padded vocabulary {padded_vocab} is not divisible by student TP {s}")


def _load_weights(model: GPTModel | None, groups: TeacherGroups, path: str) -> None:
    """Collective over the world: teacher ranks read their shards, the others take part empty.

    Replica ids come from the teacher's groups (``dp_cp_group`` = the teacher replica group), so
    each shard has exactly one main replica whatever the student's layout. The checkpoint is
    untrusted input: nothing in it is unpickled beyond plain metadata (see
    :mod:`salt_megatron.checkpoint.untrusted`).
    """
    if model is None or groups.pgs is None:
        load_weights(None, path)
        return
    load_weights(model, path, metadata={"dp_cp_group": groups.pgs.dp})


class Teacher:
    """A frozen GPT on this rank's teacher groups; logits come out in the student's layout."""

    def __init__(
        self,
        model: GPTModel,
        groups: TeacherGroups,
        layout: lx.VocabLayout,
        student_tp_group: Any,
        true_vocab: int,
        fp8: bool,
    ) -> None:
        self.model: GPTModel | None = model
        self.groups = groups
        self.layout = layout
        self.student_tp_group = student_tp_group
        self.true_vocab = true_vocab
        self.fp8 = fp8
        self._logged_modes: set[str] = set()

    @classmethod
    def build(
        cls,
        cfg: SaltConfig,
        student_tp_group: Any,
        student_tp_rank: int,
        student_tp_size: int,
        is_last_stage: bool,
        student_padded_vocab: int,
        tokenizer_fingerprint: str,
        *,
        vocab_size: int | None = None,
    ) -> Teacher | None:
        """Check the checkpoint, create the groups, build and load the teacher (all ranks call).

        Args:
            student_tp_group: this rank's student TP group (vocabulary shards in rank order).
            is_last_stage: the teacher lives on the student's last pipeline stage only.
            student_padded_vocab: the student's padded vocabulary ``V``; the teacher is built
                with it (divisible by the teacher TP size since that divides the student's).
            tokenizer_fingerprint: the student's; must equal the checkpoint's.
            vocab_size: the true vocabulary size (columns ``>= vocab_size`` are padding);
                default ``cfg.model.vocab_size``, else the checkpoint's.

        Returns:
            The teacher, or None on ranks of other pipeline stages. Raises :class:`TeacherError`
            (on every rank alike, before any collective) when the checks fail.
        """
        t = cfg.parallel.teacher_tensor_model_parallel_size
        _check_layout(t, student_tp_size, student_padded_vocab)
        ckpt = resolve_checkpoint(cfg.distill.kd_teacher_load)
        model_cfg = teacher_model_config(ckpt, cfg)
        true_vocab = vocab_size or cfg.model.vocab_size
        check_compatible(ckpt, model_cfg, cfg, tokenizer_fingerprint, true_vocab)
        true_vocab = true_vocab or ckpt.meta.get("vocab_size") or model_cfg.vocab_size
        if true_vocab is None:
            raise TeacherError(f"{ckpt.path}: the true vocabulary size is unknown (--vocab-size)")
        check_fp8(cfg.training.fp8_format, cfg.training.fp8_recipe)
        groups = build_teacher_groups(student_tp_group, is_last_stage, t)
        model = None
        if groups.holds_teacher:
            with torch.no_grad():
                model = build_gpt(
                    model_cfg,
                    mcfg.teacher_transformer_config(cfg, model_cfg),
                    padded_vocab_size=student_padded_vocab,
                    max_sequence_length=model_cfg.max_position_embeddings,
                    pre_process=True,
                    post_process=True,
                    pg_collection=groups.pgs,
                )
        _load_weights(model, groups, ckpt.path)
        if model is None:
            return None
        model.eval()
        model.requires_grad_(False)
        layout = lx.VocabLayout(student_tp_size, t, student_tp_rank)
        teacher = cls(
            model, groups, layout, student_tp_group, int(true_vocab),
            cfg.training.fp8_format is not None,
        )  # fmt: skip
        log.info(f"teacher: {teacher.describe(ckpt)}")
        return teacher

    def describe(self, ckpt: TeacherCheckpoint | None = None) -> str:
        """One line: size, layout, source."""
        n = sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0
        src = f" from {ckpt.path}" if ckpt is not None else ""
        return (
            f"{n / 1e6:.2f}M params/rank{src}, teacher TP {self.layout.teacher_tp} inside "
            f"student TP {self.layout.student_tp} ({self.layout.replicas} replicas)"
        )

    @torch.no_grad()
    def forward_shard(self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor) -> torch.Tensor:
        """The teacher's own vocab-parallel logits ``[s, b, V/t]`` for ``tokens_bs`` ``[b, s]``."""
        if self.model is None:
            raise RuntimeError("the teacher was released")
        logits = self.model(tokens_bs, position_ids_bs, attention_mask=None)
        # GPTModel returns [b, s, V/t] (it transposes at the end without labels).
        return logits.transpose(0, 1).contiguous()

    def _log_mode(self, mode: str, batch: int) -> None:
        if mode in self._logged_modes:
            return
        self._logged_modes.add(mode)
        k = self.layout.replicas
        why = {
            "local": "teacher TP == student TP, no exchange",
            "split": f"{k} replicas each compute ~{batch}/{k} sequences, then one all-to-all",
            "redundant": f"micro-batch of {batch} < {k} replicas: every replica computes all of "
            "it (redundant teacher compute)",
        }[mode]
        log.info(f"teacher logits: {mode} mode ({why})")

    @torch.no_grad()
    def student_layout_logits(
        self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor
    ) -> torch.Tensor:
        """Teacher logits ``[s, b, V/s_tp]``: this student TP rank's vocabulary slice.

        Args:
            tokens_bs: ``[b, s]`` int64 token ids (the student's micro-batch).
            position_ids_bs: ``[b, s]`` int64 positions.

        Returns:
            ``[s, b, V/s_tp]`` contiguous, in the teacher's dtype, no grad; columns whose global
            index is ``>= true vocab`` set to :data:`PAD_LOGIT`. Collective over the student TP
            group except when the teacher and student TP sizes are equal.
        """
        lay, batch = self.layout, tokens_bs.shape[0]
        mode = lx.choose_mode(lay, batch)
        self._log_mode(mode, batch)
        if mode == "split":
            served = lx.batch_chunks(batch, lay.replicas)
            start = sum(served[: lay.replica])
            rows = slice(start, start + served[lay.replica])
            shard_sbv = self.forward_shard(tokens_bs[rows], position_ids_bs[rows])
            out_sbv = lx.exchange_to_student_layout(shard_sbv, lay, served, self.student_tp_group)
        else:
            shard_sbv = self.forward_shard(tokens_bs, position_ids_bs)
            if mode == "local" or lay.teacher_tp == 1:
                out_sbv = lx.local_student_slice(shard_sbv, lay)
            else:  # redundant with 1 < t < s: replica 0 serves every sequence
                served = [batch] + [0] * (lay.replicas - 1)
                mine = shard_sbv if lay.replica == 0 else shard_sbv[:, :0]
                out_sbv = lx.exchange_to_student_layout(mine, lay, served, self.student_tp_group)
        width = out_sbv.shape[-1]
        return lx.mask_padded_vocab(out_sbv, lay.student_rank * width, self.true_vocab, PAD_LOGIT)

    def release(self) -> int:
        """Free the model, its buffers and FP8 state, destroy the teacher's groups.

        Every teacher rank calls it at the same point. Returns the bytes freed: the teacher's
        parameter and buffer bytes on CPU, the drop of ``torch.cuda.memory_allocated`` on GPU.
        """
        if self.model is None:
            return 0
        on_gpu = torch.cuda.is_available()
        before = torch.cuda.memory_allocated() if on_gpu else 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        host_bytes = sum(t.numel() * t.element_size() for t in tensors)
        del tensors
        # FP8 state (per-module fp8_meta, FP8 weight tensors) goes with the modules. TE's global
        # FP8GlobalStateManager is shared with the student and is deliberately not reset.
        self.model = None
        gc.collect()
        destroyed = self.groups.destroy()
        freed = before - torch.cuda.memory_allocated() if on_gpu else host_bytes
        if on_gpu:
            torch.cuda.empty_cache()
        log.info(f"teacher released: {freed / 2**20:.1f} MiB freed, {destroyed} groups destroyed")
        return int(freed)
