"""The ``sft`` section: supervised fine-tuning on prompt/response or chat records (docs/sft.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from salt_megatron.config.base import check, check_positive, flag


@dataclass
class SFTConfig:
    """Supervised fine-tuning: packed prompt/response or chat examples, loss on responses only."""

    sft: bool = False
    """Fine-tune on --sft-data instead of pretraining on --data-path (Megatron-LM's flag)."""
    sft_data: str | None = None
    """JSONL file of SFT records: {"prompt": str, "response": str} or {"messages": [{"role":
    "system"|"user"|"assistant", "content": str}, ...]} (docs/sft.md)."""
    sft_valid_data: str | None = None
    """A separate JSONL file of held-out records for validation (loss over response tokens)."""
    sft_valid_fraction: float = 0.0
    """Hold out this fraction of --sft-data's examples (a seeded choice) for validation."""
    sft_epochs: int | None = None
    """Train for this many epochs of the packed set: sets --train-iters (which may not be given
    too) to the whole global batches these epochs hold."""
    sft_skip_bad_lines: bool = False
    """Skip and count malformed records (bad JSON, a missing key, an empty response) instead of
    stopping at the first with an error naming its file:line."""
    pretrained_checkpoint: str | None = None
    """Checkpoint root to fine-tune from (its latest step; any layout): its weights, with a fresh
    optimizer and LR schedule, when --load holds no checkpoint yet. Model-shape, tokenizer and
    --seq-length flags not given default to the checkpoint's."""

    def __post_init__(self) -> None:
        check_positive(self, "", "sft_epochs")
        check(
            0.0 <= self.sft_valid_fraction < 1.0,
            f"--sft-valid-fraction must be in [0, 1), got {self.sft_valid_fraction}",
        )
        check(
            not (self.sft_valid_data and self.sft_valid_fraction > 0),
            "--sft-valid-data and --sft-valid-fraction are two held-out sets: give one",
        )
        if self.sft:
            check(bool(self.sft_data), "--sft needs --sft-data (a JSONL file of SFT records)")
            return
        for name in ("sft_data", "sft_valid_data", "sft_epochs", "pretrained_checkpoint"):
            check(getattr(self, name) is None, f"{flag(name)} needs --sft")
        check(self.sft_valid_fraction == 0, "--sft-valid-fraction needs --sft")

    @property
    def has_valid(self) -> bool:
        """Whether the run holds out records for validation."""
        return bool(self.sft_valid_data) or self.sft_valid_fraction > 0


def check_sft_run(cfg: Any) -> None:
    """Checks between the ``sft`` section and the others (``cfg``: the whole SaltConfig)."""
    sft = cfg.sft
    check(
        not (cfg.data.data_path or cfg.data.mock_data),
        "--sft trains on --sft-data: drop --data-path / --mock-data",
    )
    check(
        not cfg.distill.enabled,
        "--sft does no knowledge distillation: drop --kd-teacher-load / --kd-targets "
        "(or set --kd-steps 0)",
    )
    check(
        cfg.model.transformer_impl == "local",
        "--sft packs examples with a block-diagonal attention mask on the local layer spec; "
        "Transformer Engine would need packed-sequence parameters (thd), which are not "
        "implemented: use --transformer-impl local",
    )
    check(
        not cfg.training.eval_interval or sft.has_valid,
        f"--eval-interval {cfg.training.eval_interval} with --sft needs a held-out set: "
        "--sft-valid-data or --sft-valid-fraction (or --eval-interval 0)",
    )


def check_given(values: dict[str, dict[str, Any]]) -> None:
    """Checks of which flags were given (``{section: {field: value}}``, before defaults)."""
    sft, training = values.get("sft") or {}, values.get("training") or {}
    check(
        sft.get("sft_epochs") is None or "train_iters" not in training,
        "--sft-epochs sets --train-iters from the packed set's size: give one of them",
    )
