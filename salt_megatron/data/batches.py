"""Deterministic, resumable micro-batch iterators over GPT datasets, per data-parallel rank.

The order of samples depends only on the dataset (whose shuffling is seeded) and the number of
samples consumed, so a run resumed from ``consumed_samples`` sees exactly the batches it would have
seen. Every tensor-parallel rank reads the same micro-batch (no broadcast is needed); only the
pipeline stages that use data (first: tokens; last: labels and mask) get an iterator.

With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` reads and collates micro-batches in
worker processes (in order: the sampler fixes which samples each batch holds), and with
``pin_memory`` it copies them into page-locked memory, so the copy to the GPU
(:func:`to_device`, ``non_blocking``) overlaps the step instead of stalling it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from salt_megatron.data.teacher_targets import TARGET_KEYS

Batch = dict[str, torch.Tensor]
_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
SEGMENT_KEY = "segment_ids"
"""Packed SFT samples' per-position example index ``[s]`` (:mod:`salt_megatron.data.sft_pack`)."""


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
    the stored teacher targets when the samples carry them (``[b, s, k]`` / ``[b, s]``) and
    packed SFT samples' ``segment_ids`` (``[b, s]`` int64)."""
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
    if SEGMENT_KEY in samples[0]:  # packed SFT sequences: the example of each position
        batch[SEGMENT_KEY] = torch.stack([torch.as_tensor(s[SEGMENT_KEY]) for s in samples]).long()
    return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Copy a micro-batch to ``device`` (asynchronously from pinned host memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _BatchSampler:
    """The index lists of :func:`sample_indices` as a DataLoader ``batch_sampler`` (endless)."""

    def __init__(self, *args: int) -> None:
        self.args = args

    def __iter__(self) -> Iterator[list[int]]:
        return sample_indices(*self.args)


class MicroBatchIterator:
    """This rank's micro-batches, in the resumable order of :func:`sample_indices`.

    ``num_workers``: DataLoader worker processes (0: read on the calling thread);
    ``pin_memory``: collate into page-locked memory (set it when the batches go to a GPU).
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        sampler = _BatchSampler(consumed_samples, micro_batch_size, dp_rank, dp_size, len(dataset))
        self.loader: DataLoader | None = None
        if num_workers > 0 or pin_memory:
            self.loader = DataLoader(
                dataset,
                batch_sampler=sampler,  # type: ignore[arg-type]
                collate_fn=collate,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
            )
            self._batches: Iterator[Batch] = iter(self.loader)
        else:
            self._batches = (collate([dataset[i] for i in idx]) for idx in sampler)

    def __iter__(self) -> MicroBatchIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)


def stage_iterators(
    dataset: Any,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    chunk_uses_data: Sequence[bool],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> list[MicroBatchIterator | None]:
    """One iterator per model chunk that needs data (first or last stage), None for the others.

    Each chunk gets its own iterator over the same sample order: the interleaved schedule pulls
    micro-batches for different chunks at different times.
    """

    def make() -> MicroBatchIterator:
        return MicroBatchIterator(
            dataset, micro_batch_size, dp_rank, dp_size, consumed_samples,
            num_workers=num_workers, pin_memory=pin_memory,
        )  # fmt: skip

    return [make() if uses else None for uses in chunk_uses_data]
