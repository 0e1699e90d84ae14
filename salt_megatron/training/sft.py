"""Supervised fine-tuning in the trainer (``--sft``): its data, length, pretrained weights, logs.

:class:`SFTRun` is what ``run.py`` adds to a pretraining job under ``--sft``:

* the tokenizer (checked against ``--pretrained-checkpoint``'s fingerprint) and the packed
  training and held-out sets (:mod:`salt_megatron.data.sft`, :mod:`salt_megatron.data.sft_pack`);
* ``--sft-epochs``: ``--train-iters`` set to the whole global batches that many epochs hold;
* after the checkpointer's resume: the pretrained weights when ``--load`` held no checkpoint
  (fresh optimizer and LR schedule), else a check that the checkpoint is this SFT run's;
* the validation over the whole held-out set, and the log columns ``response_tokens`` (tokens the
  loss covered, per step) and ``epoch``.

The loop, logging, checkpointing and resume are the trainer's (see ``docs/sft.md``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from salt_megatron.checkpoint import trainer_state
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.saved import (
    LoadError,
    check_tokenizer,
    load_weights,
    resolve,
    saved_padded_vocab,
)
from salt_megatron.config.base import flag
from salt_megatron.config.schema import ConfigError, SaltConfig
from salt_megatron.data.errors import DataError
from salt_megatron.data.sft import Example, read_examples
from salt_megatron.data.sft_pack import PackedSFTDataset, fit, split_held_out
from salt_megatron.data.tokenizer_base import file_sha256
from salt_megatron.training.batch_schedule import BatchSchedule
from salt_megatron.training.data import build_tokenizer
from salt_megatron.training.logger import log


def steps_for_epochs(schedule: BatchSchedule, epochs: int, sequences: int) -> int:
    """The most optimizer steps whose global batches fit in ``epochs x sequences`` samples."""
    total = epochs * sequences
    low, high = 0, total  # every step consumes at least one sample
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if schedule.samples_before(mid) <= total else (low, mid - 1)
    return low


class SFTRun:
    """The SFT side of one job (every rank builds the same)."""

    def __init__(self, cfg: SaltConfig, dp: int) -> None:
        sft = cfg.sft
        self.reports: list[str] = []
        self.pretrained: Any = None
        self.padded_vocab: int | None = None
        try:
            self.tokenizer = self._tokenizer(cfg)
        except LoadError as exc:
            raise ConfigError(str(exc)) from None
        examples = self._read(sft.sft_data, cfg, "--sft-data")  # type: ignore[arg-type]
        if sft.sft_valid_data:
            valid = self._read(sft.sft_valid_data, cfg, "--sft-valid-data")
        elif sft.sft_valid_fraction > 0:
            examples, valid = split_held_out(examples, sft.sft_valid_fraction, cfg.training.seed)
        else:
            valid = []
        seq, eod, seed = cfg.data.seq_length, self.tokenizer.eod, cfg.training.seed
        self.train = PackedSFTDataset(examples, seq, eod, seed)
        self.reports.append(self.train.stats.format("SFT training set"))
        self.cfg = self._with_length(cfg, dp)
        self.valid: PackedSFTDataset | None = None
        self.eval_iters = cfg.training.eval_iters
        if valid:  # whole micro-batches on every DP rank (a multiple of PP when interleaved)
            per_micro = cfg.training.micro_batch_size * dp
            vpp = cfg.parallel.virtual_pipeline_model_parallel_size
            rows = per_micro * (cfg.parallel.pipeline_model_parallel_size if vpp else 1)
            self.valid = PackedSFTDataset(valid, seq, eod, seed, shuffle=False, pad_to=rows)
            self.eval_iters = len(self.valid) // per_micro
            self.reports.append(self.valid.stats.format("SFT held-out set"))

    # ---- set-up --------------------------------------------------------------------------------
    def _tokenizer(self, cfg: SaltConfig) -> Any:
        root = cfg.sft.pretrained_checkpoint
        if not root:
            if not cfg.data.tokenizer_model:
                raise ConfigError("--sft needs --tokenizer-model, or --pretrained-checkpoint's")
            self.reports.append("no --pretrained-checkpoint: fine-tuning from random weights")
            return build_tokenizer(cfg)
        self.pretrained = resolve(root, flag="--pretrained-checkpoint")
        meta, path = self.pretrained.meta, self.pretrained.path
        tokenizer = check_tokenizer(meta, path, cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        self.padded_vocab = saved_padded_vocab(meta, path, cfg.parallel.tensor_model_parallel_size)
        return tokenizer

    def _read(self, path: str, cfg: SaltConfig, flag: str) -> list[Example]:
        if not os.path.isfile(path):
            raise DataError(f"{flag} {path}: no such file")
        examples, bad = read_examples(path, self.tokenizer, cfg.sft.sft_skip_bad_lines)
        kept, too_long = fit(examples, cfg.data.seq_length)
        line = f"{path}: {len(examples) + bad.count} records"
        if bad.count:
            line += f"; skipped {bad.count} bad (--sft-skip-bad-lines; first: {bad.examples[0]})"
        self.reports.append(line)
        if too_long.count:
            self.reports.append(f"{path}: " + too_long.format(cfg.data.seq_length))
        if not kept:
            raise DataError(f"{path}: no usable example (see the counts above: {line})")
        return kept

    def _with_length(self, cfg: SaltConfig, dp: int) -> SaltConfig:
        """``cfg`` with ``--train-iters`` from ``--sft-epochs``; the train set sized to the run."""
        schedule = BatchSchedule(cfg.training, dp)
        sequences = len(self.train.packs)
        epochs = cfg.sft.sft_epochs
        if epochs is not None:
            steps = steps_for_epochs(schedule, epochs, sequences)
            if steps == 0:
                raise DataError(
                    f"--sft-epochs {epochs} of {sequences} packed sequences are fewer than one "
                    f"global batch ({cfg.training.global_batch_size}): lower "
                    "--global-batch-size or raise --sft-epochs"
                )
            training = dataclasses.replace(cfg.training, train_iters=steps)
            cfg = dataclasses.replace(cfg, training=training)
        samples = schedule.samples_before(cfg.training.train_iters)
        self.train.set_epochs(-(-samples // sequences))
        self.reports.append(
            f"SFT: {cfg.training.train_iters} steps read {samples} sequences = "
            f"{samples / sequences:.2f} epochs of {sequences}"
        )
        return cfg

    # ---- the trainer's hooks ----------------------------------------------------------------
    def install(self, trainer: Any) -> None:
        """Validation over the whole held-out set; the SFT log columns; the data report."""
        trainer.eval_iters = self.eval_iters
        trainer.log_columns = self.log_columns(trainer)
        for line in self.reports:
            log.info(line)

    def log_columns(self, trainer: Any) -> Callable[[list[Any]], dict[str, float]]:
        """``response_tokens`` (mean per step of the window) and ``epoch`` (fractional)."""
        sequences = len(self.train.packs)

        def columns(window: list[Any]) -> dict[str, float]:
            tokens = sum(r.tokens for r in window) / len(window)
            return {"response_tokens": tokens, "epoch": trainer.consumed_samples / sequences}

        return columns

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of the SFT set (``salt_meta.json`` ``extra.sft``)."""
        sft = self.cfg.sft
        files = [p for p in (sft.sft_data, sft.sft_valid_data) if p]
        return {
            "sft": {
                "data": [os.path.abspath(p) for p in files],
                "sha256": [file_sha256(p) for p in files],
                "sequences": len(self.train.packs),
                "pretrained_checkpoint": self.pretrained.path if self.pretrained else None,
            }
        }

    def start(self, trainer: Any, resumed_step: int | None, saved_extra: dict[str, Any]) -> None:
        """After the checkpointer's resume: the pretrained weights on a fresh start; on a resume,
        the check that the checkpoint is an SFT run's on the same set."""
        if resumed_step is None:
            if self.pretrained is not None:
                self.load_pretrained(trainer)
            return
        saved = saved_extra.get("sft")
        where = f"--load {self.cfg.checkpoint.load}"
        if saved is None:
            raise CheckpointError(
                f"{where} holds a checkpoint that is not an SFT run's (step {resumed_step}): give "
                "it as --pretrained-checkpoint and --load/--save a new directory"
            )
        now = self.state()["sft"]
        if (saved.get("sha256"), saved.get("sequences")) != (now["sha256"], now["sequences"]):
            raise DataError(
                f"{where}: its SFT set ({saved.get('data')}, {saved.get('sequences')} sequences) "
                f"is not this run's ({now['data']}, {now['sequences']}): resuming would read "
                "another order; start a new run from it with --pretrained-checkpoint"
            )

    def load_pretrained(self, trainer: Any) -> None:
        """The pretrained weights into ``trainer``'s chunks (any saved layout) and its optimizer's
        main parameters; the optimizer state and LR schedule stay fresh."""
        meta, path = self.pretrained.meta, self.pretrained.path
        saved = (meta.get("config") or {}).get("model") or {}
        diffs = [
            f"{flag(name)} {getattr(self.cfg.model, name)} (checkpoint: {saved[name]})"
            for name in trainer_state.SHAPE_FIELDS
            if name in saved and saved[name] != getattr(self.cfg.model, name)
        ]
        if diffs:
            raise CheckpointError(
                f"--pretrained-checkpoint {path}: the model does not match: " + ", ".join(diffs)
            )
        load_weights(trainer.model, path)
        trainer.optimizer.reload_model_params()  # bf16 / distributed: main params copy the load
        log.info(
            f"fine-tuning from {path} (step {self.pretrained.step}): weights loaded, fresh "
            "optimizer and LR schedule"
        )
