"""Train/valid/test GPT datasets through megatron-core's ``BlendedMegatronDatasetBuilder``.

Each dataset yields megatron's ``GPTDataset`` dicts: ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` (int64/float tensors of length ``seq_length``; no attention mask, no
position-id/attention resets, no eod loss masking).

Distributed use: megatron's builder builds on global rank 0 first, then (after a
``torch.distributed.barrier`` on the default group) on the other ranks, which load rank 0's
cached indices. So :func:`build_gpt_datasets` must be called on every rank of the default
process group (it runs collective barriers), with a shared ``cache_dir``; ``is_built_on_rank``
decides which ranks get datasets (others get ``None``) and must be True on global rank 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from salt_megatron.data.errors import DataError
from salt_megatron.data.indexed import (
    check_tokenizer_record,
    read_sequence_lengths,
    validate_indexed_dataset,
)

Blend = tuple[list[str], list[float] | None]


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(blend: str | Sequence[str] | None) -> Blend | None:
    """Parse a Megatron-style blend into ``(prefixes, weights or None)``.

    Accepts ``"prefix"``, ``["prefix"]``, ``["w1", "p1", "w2", "p2"]``, the same as one
    whitespace-separated string, or several prefixes without weights (weights then follow the
    datasets' sizes). Raises :class:`DataError` when weights do not parse, are negative or
    non-finite, all zero, or a weight has no prefix.
    """
    if blend is None:
        return None
    items = blend.split() if isinstance(blend, str) else [str(x).strip() for x in blend]
    items = [x for x in items if x]
    if not items:
        raise DataError("empty data blend")
    numeric = [_as_float(x) is not None for x in items]
    if len(items) == 1:
        if numeric[0]:
            raise DataError(f"blend {items}: a weight ({items[0]}) without a dataset prefix")
        return [items[0]], None
    if not any(numeric[0::2]):
        if any(numeric):
            raise DataError(f"blend {items}: weights do not parse (expected 'w1 p1 w2 p2 ...')")
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise DataError(
            f"blend {items}: weights do not parse (expected 'w1 p1 w2 p2 ...', "
            "a float before every prefix)"
        )
    weights = [float(w) for w in items[0::2]]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"blend {items}: weights must be finite, >= 0 and not all zero")
    return items[1::2], weights


def _split_ranges(split: str) -> list[tuple[float, float] | None]:
    """Megatron's split matrix for ``split`` ("969,30,1"), or :class:`DataError`."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = [p.strip() for p in split.split(",")]
    if not 1 <= len(parts) <= 3 or any(_as_float(p) is None or float(p) < 0 for p in parts):
        raise DataError(f"split {split!r}: expected up to 3 comma-separated weights >= 0")
    if sum(float(p) for p in parts) <= 0:
        raise DataError(f"split {split!r}: weights sum to zero")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _check_prefix(
    prefix: str,
    split: str,
    num_samples: Sequence[int | None],
    tokenizer: Any,
    verify_tokenizer: bool,
) -> None:
    """Validate one dataset prefix: files, tokenizer record, non-empty requested splits."""
    info = validate_indexed_dataset(prefix)
    check_tokenizer_record(prefix, tokenizer, require=verify_tokenizer)
    if info.num_sequences == 0:
        raise DataError(f"dataset {prefix} holds no documents")
    lengths = read_sequence_lengths(prefix)
    for name, rng, wanted in zip(("train", "valid", "test"), _split_ranges(split), num_samples):
        if rng is None or wanted == 0:
            continue
        beg = round(rng[0] * info.num_sequences)
        end = round(rng[1] * info.num_sequences)
        if int(lengths[beg:end].sum(dtype="int64")) == 0:
            raise DataError(
                f"dataset {prefix}: split {split!r} leaves the {name} split with no tokens "
                f"({end - beg} of {info.num_sequences} documents); use more data, another "
                f"split, or request 0 {name} samples"
            )


def _validate_request(
    blend: str | Sequence[str] | None,
    split: str,
    seq_length: int,
    num_samples: Sequence[int | None],
    tokenizer: Any,
    mock: bool,
    verify_tokenizer: bool,
) -> Blend | None:
    """Check the arguments of :func:`build_gpt_datasets` and every prefix; return the blend."""
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3:
        raise DataError(f"num_samples must be (train, valid, test), got {num_samples}")
    parsed = None if mock else parse_blend(blend)
    if not mock and parsed is None:
        raise DataError("no data blend given (pass mock=True to train on mock data)")
    _split_ranges(split)
    if parsed is not None and parsed[1] is not None and None in num_samples:
        raise DataError(f"a weighted blend needs a sample count for every split, got {num_samples}")
    if parsed is not None:
        for prefix in parsed[0]:
            _check_prefix(prefix, split, num_samples, tokenizer, verify_tokenizer)
    return parsed


def _check_ranks(is_built_on_rank: Callable[[], bool], parsed: Blend | None) -> None:
    """Megatron's builder needs rank 0 to build, and blends need torch.distributed."""
    import torch

    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if initialized and dist.get_rank() == 0 and not is_built_on_rank():
        raise DataError("is_built_on_rank() must be True on global rank 0 (megatron builds there)")
    if not initialized and parsed is not None and len(parsed[0]) > 1:
        raise DataError(
            "a blend of several datasets needs torch.distributed initialised (megatron's "
            "BlendedDataset asks for the rank); call salt_megatron.runtime.init_distributed()"
        )


def build_gpt_datasets(
    blend: str | Sequence[str] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    tokenizer: Any,
    cache_dir: str,
    mock: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
    verify_tokenizer: bool = True,
    mmap_bin_files: bool = True,
) -> tuple[Any, Any, Any]:
    """Build ``(train, valid, test)`` GPT datasets (each ``None`` if empty or not on this rank).

    ``blend``: a prefix or ``"w1 p1 w2 p2"`` (see :func:`parse_blend`); ignored with ``mock``.
    ``split``: train/valid/test weights, e.g. ``"969,30,1"``. ``num_samples``: samples per
    split (``None``: one epoch). ``tokenizer``: a sentencepiece or Hugging Face tokenizer (checked
    against each prefix's ``.tokenizer.json`` unless ``verify_tokenizer=False``), or for
    ``mock=True`` e.g. ``NullTokenizer(vocab_size)``, which yields megatron's MockGPTDataset.
    ``cache_dir``: megatron's index cache, shared by all ranks. Must be called on all ranks
    when ``torch.distributed`` is initialised.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    parsed = _validate_request(
        blend, split, seq_length, num_samples, tokenizer, mock, verify_tokenizer
    )
    if is_built_on_rank is None:
        is_built_on_rank = _always
    _check_ranks(is_built_on_rank, parsed)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parsed,
        split=None if mock else split,
        path_to_cache=cache_dir,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if mock:
        config.split = split
        config.split_matrix = _split_ranges(split)
    os.makedirs(cache_dir, exist_ok=True)
    cls = MockGPTDataset if mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, list(num_samples), is_built_on_rank, config)
    train, valid, test = builder.build()
    return train, valid, test


def _always() -> bool:
    """Default ``is_built_on_rank``: every rank gets the datasets."""
    return True
