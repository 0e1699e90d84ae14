"""Packing SFT examples into fixed-length sequences, and the datasets the trainer reads.

**Packing** (:func:`pack`): best-fit decreasing, once per run. The examples are shuffled with the
seed (which orders equal lengths), sorted by length, longest first, and each goes into the open
sequence with the least room that still fits it, else into a new one. Every example is in
exactly one sequence; a sequence holds examples whole, in ``seq_length`` positions (an example of
``n`` ids takes ``n - 1``: inputs ``ids[:-1]``, labels ``ids[1:]``). The packing is fixed for the
run; each epoch reads the sequences in its own seeded order (:class:`PackedSFTDataset`).

**A packed sequence** holds, per position: ``tokens`` and ``labels`` (int64), ``loss_mask``
(float32: 1 on the labels the loss covers), ``position_ids`` (int64, restarting at 0 in every
example), and ``segment_ids`` (int64: the example's index in the sequence). The padding after the
last example is one more segment (positions from 0, tokens and labels the eod, no loss): the
forward step builds a causal mask inside each segment from ``segment_ids``, so no position sees
another example's tokens and padding is seen by nothing else.

Examples longer than the sequence are never truncated: :func:`fit` leaves them out and reports
them (count and first few ``file:line``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from salt_megatron.data.errors import DataError
from salt_megatron.data.sft import Example

PACK_STREAM, SPLIT_STREAM = 0, 1
"""Seed streams: ``(seed, stream)`` orders the packing and draws the held-out split; epoch ``e``
is ordered by ``(seed, 2 + e)``."""


@dataclass
class TooLong:
    """Examples left out because they do not fit the sequence."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def format(self, seq_length: int) -> str:
        """One log line."""
        first = ", ".join(self.examples)
        return (
            f"left out {self.count} examples longer than --seq-length {seq_length} (never "
            f"truncated; first: {first})"
        )


def fit(examples: list[Example], seq_length: int, keep: int = 5) -> tuple[list[Example], TooLong]:
    """The examples that fit ``seq_length`` positions, and those left out."""
    kept, too_long = [], TooLong()
    for example in examples:
        if example.positions <= seq_length:
            kept.append(example)
            continue
        too_long.count += 1
        if len(too_long.examples) < keep:
            too_long.examples.append(f"{example.where} ({example.positions} positions)")
    return kept, too_long


def split_held_out(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(train, held out)``: ``round(fraction * n)`` examples (at least 1) drawn with the seed."""
    n = len(examples)
    n_valid = max(1, round(fraction * n))
    if n_valid >= n:
        raise DataError(
            f"--sft-valid-fraction {fraction} holds out {n_valid} of the {n} examples: nothing "
            "left to train on"
        )
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    held = set(order[:n_valid].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    valid = [e for i, e in enumerate(examples) if i in held]
    return train, valid


def pack(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: lists of indices into ``lengths`` whose sums are <= ``capacity``.

    Ties in length are ordered by a permutation drawn from ``(seed, PACK_STREAM)``; each length
    must be in ``[1, capacity]``. Runs in O(n log n) (plus list moves).
    """
    shuffled = np.random.default_rng([seed, PACK_STREAM]).permutation(len(lengths))
    order = sorted(shuffled.tolist(), key=lambda i: -lengths[i])  # stable: ties stay shuffled
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, pack index), ascending
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            packs.append([i])
            space, p = capacity - n, len(packs) - 1
        else:
            space, p = room.pop(k)
            packs[p].append(i)
            space -= n
        if space > 0:
            bisect.insort(room, (space, p))
    return packs


@dataclass(frozen=True)
class PackStats:
    """What a packed set holds."""

    examples: int
    sequences: int
    positions: int
    """Positions filled by examples (the rest is padding)."""
    response_tokens: int
    """Tokens the loss covers, over the set."""
    seq_length: int

    @property
    def efficiency(self) -> float:
        """Filled positions / all positions."""
        return self.positions / max(self.sequences * self.seq_length, 1)

    def format(self, name: str) -> str:
        """One log line."""
        return (
            f"{name}: {self.examples} examples packed into {self.sequences} sequences of "
            f"{self.seq_length} (packing efficiency {100 * self.efficiency:.1f}%, "
            f"{self.response_tokens} response tokens)"
        )


class PackedSFTDataset:
    """Packed sequences of SFT examples, read in a seeded order per epoch.

    Sample ``i`` is sequence ``order_e[i mod P]`` of epoch ``e = i // P`` (``P`` sequences),
    for ``epochs`` epochs; with ``shuffle=False`` the order is the packing's. ``pad_to``: the
    length is rounded up to a multiple of it with empty rows (all padding, no loss), so that an
    evaluation can cover the set once in whole micro-batches on every data-parallel rank.
    Items are megatron's sample dicts (numpy arrays of ``seq_length``; see the module doc).
    """

    def __init__(
        self,
        examples: list[Example],
        seq_length: int,
        eod: int,
        seed: int,
        *,
        epochs: int = 1,
        shuffle: bool = True,
        pad_to: int = 1,
    ) -> None:
        if not examples:
            raise DataError("no SFT example fits the sequence: nothing to train or validate on")
        longest = max(e.positions for e in examples)
        if longest > seq_length:
            raise ValueError(f"an example of {longest} positions exceeds {seq_length}: fit() first")
        self.examples = examples
        self.seq_length, self.eod, self.seed = seq_length, eod, seed
        self.shuffle = shuffle
        self.packs = pack([e.positions for e in examples], seq_length, seed)
        self.pad_to = pad_to
        self.length = 0
        self._orders: dict[int, np.ndarray] = {}
        self.set_epochs(epochs)

    def set_epochs(self, epochs: int) -> None:
        """Hold ``epochs`` epochs (the samples a run reads; the packing does not change)."""
        self.epochs = epochs
        rows = len(self.packs) * epochs
        self.length = -(-rows // self.pad_to) * self.pad_to

    @property
    def stats(self) -> PackStats:
        """Examples, sequences and fill of one epoch."""
        return PackStats(
            examples=len(self.examples),
            sequences=len(self.packs),
            positions=sum(e.positions for e in self.examples),
            response_tokens=sum(e.response_tokens for e in self.examples),
            seq_length=self.seq_length,
        )

    def __len__(self) -> int:
        return self.length

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the sequences (the last two epochs' kept)."""
        if epoch not in self._orders:
            n = len(self.packs)
            rng = np.random.default_rng([self.seed, 2 + epoch])
            self._orders = {
                **{e: o for e, o in self._orders.items() if e == epoch - 1},
                epoch: rng.permutation(n) if self.shuffle else np.arange(n),
            }
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} of {self.length}")
        epoch, k = divmod(index, len(self.packs))
        members = [] if epoch >= self.epochs else self.packs[int(self._order(epoch)[k])]
        return self.sequence([self.examples[i] for i in members])

    def sequence(self, members: list[Example]) -> dict[str, np.ndarray]:
        """One packed sequence of ``members`` (in order), padded to ``seq_length``."""
        s = self.seq_length
        tokens = np.full(s, self.eod, dtype=np.int64)
        labels = np.full(s, self.eod, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        segment_ids = np.full(s, len(members), dtype=np.int64)
        start = 0
        for k, example in enumerate(members):
            end = start + example.positions
            tokens[start:end] = example.ids[:-1]
            labels[start:end] = example.ids[1:]
            loss_mask[start:end] = example.target[1:]
            position_ids[start:end] = np.arange(example.positions)
            segment_ids[start:end] = k
            start = end
        position_ids[start:] = np.arange(s - start)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
        }
