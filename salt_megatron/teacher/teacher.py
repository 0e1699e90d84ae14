"""The colocated, frozen teacher: its own process groups, any-layout loading, student-layout logits.

Lifecycle (design and trade-offs in ``docs/teacher.md``)::

    teacher = Teacher.build(cfg, ..., device=device())  # every rank (collective); the head
                                                        # only on the last pipeline stage
    logits_sbv = teacher.student_layout_logits(tokens_bs, position_ids_bs)   # per micro-batch
    # or, split (PP > 1: any stage computes hidden states, the last stage applies the head):
    hidden_bsh = teacher.final_hidden_states(tokens_bs, position_ids_bs)
    logits_sbv = teacher.logits_from_hidden(hidden_bsh)
    freed = teacher.release()                   # end of the KD phase, every rank

Per micro-batch (:mod:`salt_megatron.parallel.teacher_exchange`): each teacher replica inside a
student TP group runs the body (embedding, layers, final norm) on its share of the sequences,
one all-gather hands every rank the final hidden states of all of them, and each last-stage rank
applies only its student vocabulary slice of the output layer (:class:`VocabSliceHead`). With
PP > 1 :mod:`salt_megatron.distill.teacher_pass` spreads a step's micro-batches over the stages.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from salt_megatron.checkpoint import untrusted
from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig, SaltConfig
from salt_megatron.models.fp8 import check_fp8, release_fp8_state
from salt_megatron.models.gpt import build_gpt
from salt_megatron.parallel import teacher_exchange as tx
from salt_megatron.parallel.teacher_groups import TeacherGroups, build_teacher_groups
from salt_megatron.teacher.checks import (
    TeacherCheckpoint,
    TeacherError,
    check_compatible,
    resolve_checkpoint,
    teacher_model_config,
)
from salt_megatron.teacher.head import PAD_LOGIT, FinalHiddenStates, VocabSliceHead

__all__ = ["PAD_LOGIT", "Teacher"]

log = logging.getLogger(__name__)


def _check_layout(t: int, s: int, padded_vocab: int) -> None:
    if s % t:
        raise TeacherError(
            f"--teacher-tensor-model-parallel-size {t} must divide --tensor-model-parallel-size {s}"
        )
    if padded_vocab % s:
        raise TeacherError(f"padded vocabulary {padded_vocab} is not divisible by student TP {s}")


def _head_key(model: ModelConfig) -> str:
    """Checkpoint key of the teacher's output weight (the word embedding when they are tied)."""
    if model.untie_embeddings_and_output_weights:
        return "output_layer.weight"
    return "embedding.word_embeddings.weight"


def _load_weights(
    model: GPTModel, head: VocabSliceHead | None, groups: TeacherGroups, path: str, key: str
) -> None:
    """Two loads, collective over the world (ranks off the last stage load no head: empty).

    The body's shards use the teacher's groups for replica ids (``dp_cp_group`` = the teacher
    replica group: one main replica per shard whatever the student's layout); the output
    layer's own shards are dropped and the model's output layer becomes :class:`FinalHiddenStates`
    before anything is read. The head reads its slice as a second load: with tied embeddings
    its key is the embedding's, sharded differently. The checkpoint is someone else's: nothing in
    it is unpickled beyond plain metadata (:mod:`salt_megatron.checkpoint.untrusted`).
    """
    assert groups.pgs is not None
    body = model.sharded_state_dict(metadata={"dp_cp_group": groups.pgs.dp})
    for name in [k for k in body if k.startswith("output_layer.")]:
        del body[name]
    model.output_layer = FinalHiddenStates()
    state = untrusted.load_sharded({"model": body}, path)
    untrusted.load_module_state(model, state["model"], path)
    if head is None or groups.head_index is None:
        untrusted.load_sharded({}, path)
    else:
        untrusted.load_sharded(head.sharded_state_dict(key, groups.head_index), path)


class Teacher:
    """A frozen GPT on this rank's teacher groups; logits come out in the student's layout.

    Every rank holds the body; only last-stage ranks hold the head (``head`` None elsewhere).
    """

    def __init__(
        self,
        model: GPTModel,
        head: VocabSliceHead | None,
        groups: TeacherGroups,
        layout: tx.VocabLayout,
        fp8: bool,
    ) -> None:
        self.model: GPTModel | None = model
        self.head: VocabSliceHead | None = head
        self.groups = groups
        self.layout = layout
        self.fp8 = fp8
        self._logged = False

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
        device: torch.device,
        vocab_size: int | None = None,
    ) -> Teacher:
        """Check the checkpoint, create the groups, build and load the teacher (all ranks call).

        Args:
            student_tp_group: this rank's student TP group (vocabulary shards in rank order).
            is_last_stage: whether this rank is on the student's last pipeline stage; only those
                ranks build the head (every rank builds the body).
            student_padded_vocab: the student's padded vocabulary ``V``; the teacher's embedding
                is built with it (divisible by the teacher TP size since that divides the
                student's), and the head reads slice ``r`` of ``s`` of it.
            tokenizer_fingerprint: the student's; must equal the checkpoint's.
            device: where the teacher lives (this rank's GPU, or the CPU).
            vocab_size: the true vocabulary size (columns ``>= vocab_size`` are padding);
                default ``cfg.model.vocab_size``, else the checkpoint's.

        Returns:
            The teacher (on every rank). Raises :class:`TeacherError` (on every rank alike,
            before any collective) when the checks fail.
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
        check_fp8(cfg.training.fp8_format, mcfg.teacher_fp8_recipe(cfg.training.fp8_recipe))
        groups = build_teacher_groups(student_tp_group, is_last_stage, t)
        tf_config = mcfg.teacher_transformer_config(cfg, model_cfg)
        with torch.no_grad():
            model = build_gpt(
                model_cfg, tf_config, padded_vocab_size=student_padded_vocab,
                max_sequence_length=model_cfg.max_position_embeddings, pre_process=True,
                post_process=True, pg_collection=groups.pgs, device=device,
            )  # fmt: skip
        head = None
        if is_last_stage:
            width = student_padded_vocab // student_tp_size
            head = VocabSliceHead(
                model_cfg.hidden_size, width, student_tp_rank, student_tp_size, int(true_vocab),
                tf_config.params_dtype, device,
            )  # fmt: skip
        _load_weights(model, head, groups, ckpt.path, _head_key(model_cfg))
        model.eval()
        model.requires_grad_(False)
        layout = tx.VocabLayout(student_tp_size, t, student_tp_rank)
        teacher = cls(model, head, groups, layout, cfg.training.fp8_format is not None)
        log.info(f"teacher: {teacher.describe(ckpt)}")
        return teacher

    def describe(self, ckpt: TeacherCheckpoint | None = None) -> str:
        """One line: size, layout, source."""
        mods = [m for m in (self.model, self.head) if m is not None]
        n = sum(p.numel() for m in mods for p in m.parameters())
        src = f" from {ckpt.path}" if ckpt is not None else ""
        return (
            f"{n / 1e6:.2f}M params/rank{src}, teacher TP {self.layout.teacher_tp} inside "
            f"student TP {self.layout.student_tp} ({self.layout.replicas} replicas)"
        )

    @torch.no_grad()
    def final_hidden(self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor) -> torch.Tensor:
        """The body's final (normed) hidden states ``[b, s, h]`` for ``tokens_bs`` ``[b, s]``, all
        computed by this rank's replica (no split, no exchange)."""
        if self.model is None:
            raise RuntimeError("the teacher was released")
        return self.model(tokens_bs, position_ids_bs, attention_mask=None)

    def _log_layout(self, batch: int) -> None:
        if self._logged:
            return
        self._logged = True
        k = self.layout.replicas
        shares = tx.batch_chunks(batch, k)
        how = "no exchange" if k == 1 else "hidden states all-gathered"
        log.info(
            f"teacher forward: {k} replica(s) of TP {self.layout.teacher_tp} per student TP "
            f"group compute {shares} of {batch} sequences ({how}); each last-stage rank applies "
            f"its {self.layout.student_tp}-way vocabulary slice of the output layer"
        )

    @torch.no_grad()
    def final_hidden_states(
        self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor
    ) -> torch.Tensor:
        """The body's final hidden states ``[b, s, h]`` of the whole micro-batch, on every rank
        of the student TP group.

        Each teacher replica computes its share of the ``b`` sequences; one all-gather over the
        gather group (when ``t < s``) completes them. Collective over the teacher's TP and
        gather groups; no host sync.
        """
        batch, lay = tokens_bs.shape[0], self.layout
        self._log_layout(batch)
        rows = lay.rows(batch)
        if rows.stop > rows.start:
            mine_bsh = self.final_hidden(tokens_bs[rows], position_ids_bs[rows])
        else:  # fewer sequences than replicas: this replica computes none
            mine_bsh = self.empty_hidden(0, tokens_bs.shape[1])
        return tx.gather_hidden(mine_bsh, batch, lay, self.groups.gather)

    def empty_hidden(self, batch: int, seq: int) -> torch.Tensor:
        """An uninitialised ``[batch, seq, h]`` buffer for final hidden states: the teacher's
        dtype, on its device."""
        if self.model is None:
            raise RuntimeError("the teacher was released")
        w = self.model.embedding.word_embeddings.weight
        return w.new_empty((batch, seq, w.shape[1]))

    @torch.no_grad()
    def logits_from_hidden(self, hidden_bsh: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[s, b, V/s_tp]`` of this student TP rank's vocabulary slice, from the
        final hidden states ``[b, s, h]`` (:meth:`final_hidden_states`). Last stage only.

        Contiguous, in the teacher's dtype, no grad; columns whose global index is ``>= true
        vocab`` set to :data:`PAD_LOGIT`. Local: no communication.
        """
        if self.head is None:
            why = "released" if self.model is None else "not built off the last pipeline stage"
            raise RuntimeError(f"the teacher's output layer is {why}")
        return self.head(hidden_bsh.transpose(0, 1))

    def student_layout_logits(
        self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor
    ) -> torch.Tensor:
        """Teacher logits ``[s, b, V/s_tp]``: this student TP rank's vocabulary slice.

        Args:
            tokens_bs: ``[b, s]`` int64 token ids (the student's micro-batch), on the device.
            position_ids_bs: ``[b, s]`` int64 positions.

        Returns:
            :meth:`logits_from_hidden` of :meth:`final_hidden_states`: the only logits-sized
            tensor the call allocates. Collective over the teacher's gather group when ``t < s``.
        """
        return self.logits_from_hidden(self.final_hidden_states(tokens_bs, position_ids_bs))

    def release(self) -> int:
        """Free the model, its head, buffers and FP8 state, destroy the teacher's groups.

        Every teacher rank calls it at the same point. Returns the bytes freed: the teacher's
        parameter and buffer bytes on CPU, the drop of ``torch.cuda.memory_allocated`` on GPU.
        """
        if self.model is None:
            return 0
        on_gpu = torch.cuda.is_available()
        before = torch.cuda.memory_allocated() if on_gpu else 0
        mods = [m for m in (self.model, self.head) if m is not None]
        tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
        host_bytes = sum(t.numel() * t.element_size() for t in tensors)
        del tensors, mods
        fp8_modules = release_fp8_state(self.model) if self.fp8 else 0
        self.model = self.head = None
        gc.collect()
        destroyed = self.groups.destroy()
        freed = before - torch.cuda.memory_allocated() if on_gpu else host_bytes
        if on_gpu:
            torch.cuda.empty_cache()
        log.info(
            f"teacher released: {freed / 2**20:.1f} MiB freed, {destroyed} groups destroyed"
            + (f", FP8 metadata of {fp8_modules} modules cleared" if self.fp8 else "")
        )
        return int(freed)
