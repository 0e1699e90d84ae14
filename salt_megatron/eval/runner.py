"""A saved checkpoint's GPT at an evaluation layout, and token batches run through it.

:func:`load_eval_model` builds this rank's chunk of the model at the evaluation's own TP x PP
(any saved layout: dist-checkpointing keys are global) and reads the weights. :class:`EvalModel`
runs right-padded ``[b, s]`` token batches through megatron-core's forward-only schedule
(pipeline transfers at PP > 1, TP collectives inside the model) and reduces the last stage's
vocab-parallel logits without gathering the vocabulary (:mod:`.vocab_parallel`); results are
broadcast from the last stage, so every rank of a model-parallel group holds them.

Every method is collective over the model-parallel group (TP x PP) of one data-parallel replica:
all its ranks call it with the same batch. The causal mask makes right padding harmless: a
position never attends to a later one, so the padding after a row's last token changes nothing
before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from salt_megatron.checkpoint.saved import (
    LoadError,
    check_tokenizer,
    load_weights,
    resolve,
    saved_bf16,
    saved_model_config,
    saved_padded_vocab,
)
from salt_megatron.config.schema import ConfigError, ModelConfig, ParallelConfig
from salt_megatron.eval.vocab_parallel import greedy_ids, target_logprobs
from salt_megatron.parallel.state import StudentLayout


def true_vocab_size(meta: dict[str, Any], padded: int) -> int:
    """The columns a Hugging Face export keeps: a checkpoint imported from Hugging Face keeps
    its source model's ``vocab_size``, any other the tokenizer's (as ``hf/exporter.py``)."""
    source = (meta.get("source") or {}).get("config")
    if isinstance(source, dict) and source.get("vocab_size"):
        return min(int(source["vocab_size"]), padded)
    return int(meta.get("vocab_size") or padded)


@dataclass
class EvalModel:
    """This rank's chunk of a saved GPT, its tokenizer, and the layout it runs at."""

    gpt: Any
    """This rank's ``GPTModel`` chunk (eval mode)."""
    tokenizer: Any
    """The checkpoint's tokenizer (fingerprint checked)."""
    layout: StudentLayout
    vocab_size: int
    """Columns that can be scored or chosen (:func:`true_vocab_size`); the rest are padding."""
    padded_vocab: int
    max_position_embeddings: int
    step: int
    path: str

    @property
    def vocab_start(self) -> int:
        """Global id of this rank's first output column."""
        return self.layout.tp_rank * (self.padded_vocab // self.layout.tp)

    def _logits(self, tokens_bs: torch.Tensor) -> torch.Tensor | None:
        """Last stage: ``[b, s, V/tp]`` logits of ``tokens_bs``; other stages: None."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = tokens_bs.shape
        first = self.layout.is_first_stage
        position_ids_bs = torch.arange(s, device=tokens_bs.device).expand(b, s)

        def step(_iterator: Any, model: Any) -> tuple[torch.Tensor, None]:
            if first:
                return model(tokens_bs, position_ids_bs, None), None
            return model(None, None, None), None

        with torch.no_grad():
            store = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([None]), model=self.gpt,
                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
            )  # fmt: skip
        return store[0] if self.layout.is_last_stage else None

    def _from_last_stage(self, result: torch.Tensor) -> torch.Tensor:
        """``result`` as the last pipeline stage computed it, on every stage (a broadcast)."""
        lay = self.layout
        if lay.pp > 1:
            dist.broadcast(result, dist.get_global_rank(lay.pp_group, lay.pp - 1), lay.pp_group)
        return result

    def score(
        self,
        tokens_bs: torch.Tensor,
        rows_n: torch.Tensor,
        cols_n: torch.Tensor,
        targets_n: torch.Tensor,
    ) -> torch.Tensor:
        """Per row of ``tokens_bs``: ``[b, 2]`` float64 (sum of ``log p(target)``, all greedy).

        ``(rows_n, cols_n)`` are the scored positions and ``targets_n`` the tokens predicted
        there (the next input token); column 1 is 1.0 where every scored target of the row is
        the argmax over the true vocabulary, else 0.0. Rows without a scored position: (0, 1).
        """
        b = tokens_bs.shape[0]
        out_b2 = torch.zeros(b, 2, dtype=torch.float64, device=tokens_bs.device)
        logits_bsv = self._logits(tokens_bs)
        if logits_bsv is not None:
            picked_nv = logits_bsv[rows_n, cols_n]
            tp_group = self.layout.tp_group
            logp_n = target_logprobs(
                picked_nv, targets_n, self.vocab_start, self.vocab_size, tp_group
            )
            greedy_n = greedy_ids(picked_nv, self.vocab_start, self.vocab_size, tp_group)
            zeros_b = torch.zeros(b, dtype=torch.float64, device=tokens_bs.device)
            logp_b = zeros_b.index_add(0, rows_n, logp_n.double())
            missed_b = zeros_b.index_add(0, rows_n, (greedy_n != targets_n).double())
            out_b2 = torch.stack([logp_b, (missed_b == 0).double()], dim=1)
        return self._from_last_stage(out_b2)

    def next_ids(self, tokens_bs: torch.Tensor, last_b: torch.Tensor) -> torch.Tensor:
        """The greedy next token after position ``last_b[i]`` of row ``i``: ``[b]`` int64."""
        b = tokens_bs.shape[0]
        ids_b = torch.zeros(b, dtype=torch.int64, device=tokens_bs.device)
        logits_bsv = self._logits(tokens_bs)
        if logits_bsv is not None:
            picked_bv = logits_bsv[torch.arange(b, device=tokens_bs.device), last_b]
            ids_b = greedy_ids(picked_bv, self.vocab_start, self.vocab_size, self.layout.tp_group)
        return self._from_last_stage(ids_b)


def load_eval_model(
    load: str,
    step: int | None = None,
    tp: int = 1,
    pp: int = 1,
    tokenizer_model: str | None = None,
    tokenizer_type: str | None = None,
    transformer_impl: str | None = None,
) -> EvalModel:
    """Start the groups (TP x PP, the rest data-parallel), build and load (collective).

    Needs ``torch.distributed`` started or startable (torchrun's environment, or a world of 1).
    Megatron's parallel state, if already set up, must have this TP and PP.
    """
    from megatron.core.enums import ModelType

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.gpt import build_gpt
    from salt_megatron.runtime import device

    ckpt = resolve(load, step)
    model = saved_model_config(ckpt.meta, ckpt.path)
    if transformer_impl:
        model = dataclasses.replace(model, transformer_impl=transformer_impl)  # type: ignore[arg-type]
    tokenizer = check_tokenizer(ckpt.meta, ckpt.path, tokenizer_model, tokenizer_type)
    padded = saved_padded_vocab(ckpt.meta, ckpt.path, tp)
    _check_split(model, tp, pp)
    vocab = true_vocab_size(ckpt.meta, padded)
    if tokenizer.vocab_size > vocab:
        raise LoadError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's model only {vocab} "
            f"({ckpt.path}): pass the checkpoint's --tokenizer-model"
        )
    layout = _start_groups(tp, pp, ckpt.meta)
    tf_config = mcfg.transformer_config(model, tp=tp, pp=pp, bf16=saved_bf16(ckpt.meta))
    gpt = build_gpt(
        model, tf_config, padded_vocab_size=padded,
        max_sequence_length=model.max_position_embeddings, pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage, device=device(),
    )  # fmt: skip
    gpt.model_type = ModelType.encoder_or_decoder
    load_weights([gpt], ckpt.path)
    gpt.eval()
    return EvalModel(
        gpt=gpt, tokenizer=tokenizer, layout=layout,
        vocab_size=vocab, padded_vocab=padded,
        max_position_embeddings=model.max_position_embeddings, step=ckpt.step, path=ckpt.path,
    )  # fmt: skip


def _check_split(model: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a TP that does not split the heads, or a PP that does not divide the layers."""
    try:
        model.validate_tp(tp, "--tensor-model-parallel-size")
    except ConfigError as exc:
        raise LoadError(str(exc)) from None
    if model.num_layers % pp:
        raise LoadError(
            f"--pipeline-model-parallel-size {pp} does not divide the checkpoint's "
            f"{model.num_layers} layers"
        )


def _start_groups(tp: int, pp: int, meta: dict[str, Any]) -> StudentLayout:
    """Start the world and megatron's groups at TP x PP (the rest data-parallel), unless started;
    the layout. The RNG seed is the checkpoint's training seed (dropout is off in eval)."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.parallel.state import current_layout, init_student_parallel
    from salt_megatron.runtime.distributed import init_world

    world = init_world()
    if world % (tp * pp):
        raise LoadError(f"world size {world} is not divisible by TP x PP = {tp * pp}")
    if not mpu.model_parallel_is_initialized():
        saved_seed = ((meta.get("config") or {}).get("training") or {}).get("seed", 1234)
        init_student_parallel(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
            int(saved_seed),
        )
    layout = current_layout()
    if (layout.tp, layout.pp) != (tp, pp):
        raise LoadError(f"the process groups are TP {layout.tp} x PP {layout.pp}, not {tp} x {pp}")
    return layout
