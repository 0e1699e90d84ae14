"""Deterministic, resumable micro-batch iterators over GPT datasets, per data-parallel rank.

The order of samples depends only on the dataset (whose shuffling is seeded) and the number of
samples consumed, so a run resumed from ``consumed_samples`` sees exactly the batches it would have
seen. Every tensor-parallel rank reads the same micro-batch (no broadcast is needed); only the
pipeline stages that use data (first: tokens; last: labels and mask) get an iterator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from salt_megatron.data.teacher_targets import TARGET_KEYS

Batch = dict[str, torch.Tensor]
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def sample_indices(
    consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, total: int
) -> Iterator[list[int]]:
    """Indices of this DP rank's micro-batches, as Megatron's pretraining sampler orders them.

    Global micro-batch ``k`` covers samples ``[consumed + k*mbs*dp, consumed + (k+1)*mbs*dp)``;
    rank ``r`` takes the ``r``-th slice of ``mbs`` of them. Wraps around the dataset (epochs).
    """
    step = micro_batch_size * dp_size
    start = consumed_samples
    while True:
        base = start + dp_rank * micro_batch_size
        yield [(base + i) % total for i in range(micro_batch_size)]
        start += step


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack GPTDataset samples into ``{key: [b, s]}`` tensors (tokens/position_ids int64), plus
    the stored teacher targets when the samples carry them (``[b, s, k]`` / ``[b, s]``)."""
    batch: Batch = {}
    for key in _KEYS:
        column = [torch.as_tensor(s[key]) for s in samples]
        batch[key] = torch.stack(column)
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    for key in TARGET_KEYS:  # stored teacher targets (TargetsDataset), kept in their dtypes
        if key in samples[0]:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return batch


class MicroBatchIterator:
    """Iterator of this rank's micro-batches that counts what it consumed (for resumption)."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self._indices = sample_indices(
            consumed_samples, micro_batch_size, dp_rank, dp_size, len(dataset)
        )

    def __iter__(self) -> MicroBatchIterator:
        return self

    def __next__(self) -> Batch:
        return collate([self.dataset[i] for i in next(self._indices)])


def stage_iterators(
    dataset: Any,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    chunk_uses_data: Sequence[bool],
) -> list[MicroBatchIterator | None]:
    """One iterator per model chunk that needs data (first or last stage), None for the others.

    Each chunk gets its own iterator over the same sample order: the interleaved schedule pulls
    micro-batches for different chunks at different times.
    """
    return [
        MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples)
        if uses
        else None
        for uses in chunk_uses_data
    ]
