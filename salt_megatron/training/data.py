"""Datasets for a run: the tokenizer and the train/valid/test GPT datasets from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from salt_megatron.config.schema import ConfigError, SaltConfig
from salt_megatron.data.datasets import build_gpt_datasets, parse_blend
from salt_megatron.data.errors import DataError
from salt_megatron.data.tokenizer import NullTokenizer, load_tokenizer


@dataclass
class RunData:
    """The tokenizer and the three splits (a split is None when it has no samples)."""

    tokenizer: Any
    train: Any
    valid: Any
    test: Any

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (before padding)."""
        return int(self.tokenizer.vocab_size)


def build_tokenizer(cfg: SaltConfig) -> Any:
    """--tokenizer-model (of --tokenizer-type), or a null tokenizer of --vocab-size for --mock-data.

    A tokenizer without an end-of-document token is refused here, before any data is read.
    """
    if cfg.data.tokenizer_model:
        tokenizer = load_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        try:
            tokenizer.eod  # noqa: B018 - every document of the data ends with it
        except DataError as exc:
            raise ConfigError(f"--tokenizer-model: {exc}") from None
        if cfg.model.vocab_size not in (None, tokenizer.vocab_size):
            raise ConfigError(
                f"--vocab-size {cfg.model.vocab_size} differs from the tokenizer's "
                f"{tokenizer.vocab_size} ({cfg.data.tokenizer_model})"
            )
        return tokenizer
    if not cfg.data.mock_data:
        raise ConfigError("--tokenizer-model is required with --data-path")
    if cfg.model.vocab_size is None:
        raise ConfigError("--mock-data needs --vocab-size (there is no tokenizer)")
    return NullTokenizer(cfg.model.vocab_size)


def sample_counts(cfg: SaltConfig, dp: int) -> tuple[int, int, int]:
    """Samples each split must provide for --train-iters, the evaluations and the final test."""
    tr = cfg.training
    per_eval = tr.eval_iters * tr.micro_batch_size * dp
    evals = tr.train_iters // tr.eval_interval + 1 if tr.eval_interval else 1
    return tr.train_iters * tr.global_batch_size, evals * per_eval, per_eval


def _cache_dir(cfg: SaltConfig) -> str:
    if cfg.data.data_cache_path:
        return cfg.data.data_cache_path
    blend = parse_blend(cfg.data.data_path) if cfg.data.data_path else None
    if blend is None:
        return os.path.join("cache", "index")
    return os.path.join(os.path.dirname(os.path.abspath(blend[0][0])), "index-cache")


def build_run_data(cfg: SaltConfig, dp: int, blend: list[str] | None = None) -> RunData:
    """Tokenizer and datasets; ``blend`` overrides --data-path (e.g. the KD phase's blend)."""
    tokenizer = build_tokenizer(cfg)
    train, valid, test = build_gpt_datasets(
        blend if blend is not None else cfg.data.data_path,
        cfg.data.split,
        cfg.data.seq_length,
        cfg.training.seed,
        sample_counts(cfg, dp),
        tokenizer,
        _cache_dir(cfg),
        mock=cfg.data.mock_data,
    )
    return RunData(tokenizer, train, valid, test)
