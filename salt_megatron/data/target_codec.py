"""The q8 encoding of stored teacher targets (format 2): 8-bit log-probabilities, packed ids.

Pure NumPy on the host. A token's targets are ``n <= k`` distinct ids below V with their
log-probabilities ``log q_j`` at T (descending, the teacher's top-1 first) and the residual
``r = 1 - sum_j q_j``; ``Q = sum_j q_j``.

**Log-probabilities.** Per token, the span ``s = max_j log q_j - min_j log q_j`` is rounded up to
float16 and each ``log q_j`` becomes ``c_j = round(255 (log q_j - b) / s)`` (uint8), measured from
``b = max - s``: the top-1 codes to 255 exactly and the smallest kept id to about 0. Decoding
gives ``l_j = c_j s / 255``, which is ``log q_j - b`` up to half a step::

    |l_j - (log q_j - b)| <= eta = s / 510                (every kept id; 0 for the top-1)

The rounding errors are unbiased and the top-1, which carries most of the target's mass, is
exact relative to the others. (Measured from ``min`` instead, the float16 rounding-up of ``s``
landed on the top-1: +0.10% on average over the demo's store, sharper targets, and a student 0.02
nats worse; ``tests/unit/test_target_codec.py`` checks the mean error.)

The residual is kept as float16 (``r^``, relative error <= 2^-11, absolute <= 2^-25 below
2^-14), and the reader rescales the kept ids to it:
``q^_j = exp(l_j) (1 - r^) / sum_i exp(l_i)``, so the target of the loss sums to 1 exactly as
the teacher's did (``sum_j q^_j + r^ = 1``, whatever ``b`` was: it is not stored). As
``exp(l_j + b) / q_j`` and their q-weighted mean both lie in ``[e^-eta, e^eta]``::

    |q^_j / q_j - 1| <= e^(2 eta) (1 - r^) / Q - 1   (or 1 - e^(-2 eta) (1 - r^) / Q, the larger)

(:func:`relative_bound`; about ``2 eta``; plus the float32 rounding of the ``log q^`` the reader
returns, at most :data:`FLOAT32_SLACK` x ``|log q^|``), so the L1 distance between the stored
and the teacher's target distribution (kept ids plus the residual, spread uniformly or dropped)
is at most ``Q x relative_bound + |r^ - r|``, and the KD gradient ``w c / T (p - target)`` is
off by at most ``w c / T`` times that in L1 per token. A confident token (a short span) is coded
finely.

**Ids.** Sorted ascending per token, stored as gaps (the first id, then differences >= 1), each
gap split into its bytes (all low bytes, then all high bytes, which are mostly 0); the slot of
the top-1 id in that order is stored per token, and the reader puts it back in slot 0 (the
other slots follow in ascending id order; the loss only reads slot 0 for the top-1).

**Blocks.** One deflated (zlib) block per sample: ``counts | top | span (float16) | r^
(float16) | gap bytes | codes`` (counts and top are uint8 for k <= 255, else uint16; gaps are
uint16 for V <= 65,536, else uint32).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

LEVELS = 255
LOGQ_FLOOR = -60000.0
"""log-probabilities are clamped here before coding (float16's range; exp of it is 0)."""
FLOAT32_SLACK = 2.0**-23
"""Relative error of ``q^ = exp(log q^)`` per nat of ``|log q^|`` from float32 log q^."""
ZLIB_LEVEL = 6
"""zlib's default: level 9 saves 0.7% of the bytes (demo store) at 4x the encoding time."""


class Layout(NamedTuple):
    """Byte widths of one store's blocks."""

    seq: int
    top_k: int
    vocab_size: int

    @property
    def count_bytes(self) -> int:
        return 1 if self.top_k <= 255 else 2

    @property
    def id_bytes(self) -> int:
        return 2 if self.vocab_size <= 1 << 16 else 4


def float16_up(x: np.ndarray) -> np.ndarray:
    """Non-negative ``x`` rounded up to float16."""
    x = np.asarray(x, dtype=np.float64)
    x16 = x.astype(np.float16)
    low = x16.astype(np.float64) < x
    x16[low] = np.nextafter(x16[low], np.float16(np.inf))
    return x16


def relative_bound(span16: np.ndarray, mass: np.ndarray, resid16: np.ndarray) -> np.ndarray:
    """Bound on ``|q^_j / q_j - 1|`` per token (float64), from the stored float16 span, the
    teacher's kept mass ``Q`` and the stored float16 residual (module docstring)."""
    eta = span16.astype(np.float64) / (2 * LEVELS)
    scale = (1.0 - resid16.astype(np.float64)) / np.maximum(mass, np.finfo(np.float64).tiny)
    return np.maximum(np.exp(2 * eta) * scale - 1.0, 1.0 - np.exp(-2 * eta) * scale)


def _sorted_by_id(
    ids_tk: np.ndarray, logq_tk: np.ndarray, keep_tk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids and log-probabilities sorted by id per row (empty slots last), and the position of
    slot 0 (the top-1) in that order ``[T]``."""
    big = np.iinfo(np.int64).max
    order = np.argsort(np.where(keep_tk, ids_tk, big), axis=1, kind="stable")
    top = np.argmax(order == 0, axis=1)
    return np.take_along_axis(ids_tk, order, 1), np.take_along_axis(logq_tk, order, 1), top


def encode(
    ids_tk: np.ndarray, logq_tk: np.ndarray, resid_t: np.ndarray, layout: Layout
) -> list[bytes]:
    """Blocks of ``T = samples x seq`` tokens: padded ``[T, k]`` ids (-1 = empty, the kept ids
    first, the top-1 in slot 0) and log-probabilities, the ``[T]`` residual. One per sample."""
    ids_tk = np.asarray(ids_tk, dtype=np.int64)
    keep_tk = ids_tk >= 0
    counts = keep_tk.sum(1)
    if not np.array_equal(keep_tk, np.arange(ids_tk.shape[1]) < counts[:, None]):
        raise ValueError("kept ids must come first in each token's slots")
    if counts.max(initial=0) > layout.top_k or ids_tk.max(initial=0) >= layout.vocab_size:
        raise ValueError(f"more than k={layout.top_k} ids or an id >= V={layout.vocab_size}")
    logq_tk = np.clip(np.asarray(logq_tk, dtype=np.float64), LOGQ_FLOOR, 0.0)
    ids_s, logq_s, top = _sorted_by_id(ids_tk, logq_tk, keep_tk)
    has = counts > 0
    low_t = np.where(has, np.where(keep_tk, logq_tk, np.inf).min(1, initial=np.inf), 0.0)
    high_t = np.where(has, np.where(keep_tk, logq_tk, -np.inf).max(1, initial=-np.inf), 0.0)
    span16 = float16_up(high_t - low_t)
    base_t = high_t - span16.astype(np.float64)  # the top-1 codes to LEVELS exactly
    frac = np.divide(logq_s - base_t[:, None], span16.astype(np.float64)[:, None],
                     out=np.zeros_like(logq_s), where=keep_tk & (span16[:, None] > 0))  # fmt: skip
    codes = np.rint(np.clip(frac, 0.0, 1.0) * LEVELS).astype(np.uint8)
    gaps = np.diff(ids_s, axis=1, prepend=0)
    side = [counts, top]
    cw, iw = f"<u{layout.count_bytes}", f"<u{layout.id_bytes}"
    r16 = np.asarray(resid_t, dtype=np.float64).clip(0.0, 1.0).astype(np.float16)
    blocks = []
    for t0 in range(0, ids_tk.shape[0], layout.seq):
        rows = slice(t0, t0 + layout.seq)
        kept = keep_tk[rows]
        planes = gaps[rows][kept].astype(iw).view(np.uint8).reshape(-1, layout.id_bytes).T
        body = b"".join([*(x[rows].astype(cw).tobytes() for x in side),
                         span16[rows].tobytes(), r16[rows].tobytes(), planes.tobytes(),
                         codes[rows][kept].tobytes()])  # fmt: skip
        blocks.append(zlib.compress(body, ZLIB_LEVEL))
    return blocks


class Decoded(NamedTuple):
    """One sample's targets as the loss takes them (``[seq, k]``, slot 0 the top-1)."""

    ids_sk: np.ndarray  # int32, -1 = empty
    logq_sk: np.ndarray  # float32 log q^, 0 where empty
    resid_s: np.ndarray  # float32 r^
    span_s: np.ndarray  # float16 stored span (for the error bound)


def decode(block: bytes | memoryview, layout: Layout) -> Decoded:
    """Inverse of one block of :func:`encode`, checked: ValueError (what is wrong) when the
    block is malformed (counts above k, ids not increasing or not below V, a bad top slot)."""
    seq, k, cb, ib = layout.seq, layout.top_k, layout.count_bytes, layout.id_bytes
    buf = np.frombuffer(zlib.decompress(block), dtype=np.uint8)
    head = seq * (2 * cb + 4)
    if buf.size < head:
        raise ValueError(f"block of {buf.size} bytes, shorter than its {head}-byte header")
    counts = buf[: seq * cb].view(f"<u{cb}").astype(np.int64)
    top = buf[seq * cb : 2 * seq * cb].view(f"<u{cb}").astype(np.int64)
    span16 = buf[2 * seq * cb : 2 * seq * cb + 2 * seq].view(np.float16)
    r16 = buf[2 * seq * cb + 2 * seq : head].view(np.float16)
    n = int(counts.sum())
    if counts.max(initial=0) > k or buf.size != head + n * (ib + 1):
        raise ValueError(f"block of {buf.size} bytes does not hold its {n} ids (k={k})")
    if np.any(top >= np.maximum(counts, 1)) or not np.all(np.isfinite(span16) & (span16 >= 0)):
        raise ValueError("a top-1 slot beyond its token's ids or a bad span")
    r = r16.astype(np.float64)
    if not np.all((r >= 0.0) & (r <= 1.0)):
        raise ValueError("a residual outside [0, 1]")
    planes = buf[head : head + n * ib].reshape(ib, n).T.copy()
    keep_sk = np.arange(k) < counts[:, None]
    gaps_sk = np.zeros((seq, k), dtype=np.int64)
    gaps_sk[keep_sk] = planes.view(f"<u{ib}").reshape(-1)
    if np.any(gaps_sk[:, 1:][keep_sk[:, 1:]] < 1):
        raise ValueError("ids not strictly increasing within a token")
    ids_sk = np.cumsum(gaps_sk, axis=1)
    if ids_sk[keep_sk].max(initial=0) >= layout.vocab_size:
        raise ValueError(f"an id >= the vocabulary size {layout.vocab_size}")
    codes_sk = np.zeros((seq, k), dtype=np.float64)
    codes_sk[keep_sk] = buf[head + n * ib :]
    l_sk = np.where(keep_sk, codes_sk * (span16.astype(np.float64)[:, None] / LEVELS), -np.inf)
    logq_sk = _rescale(l_sk, counts, r)
    ids_sk = np.where(keep_sk, ids_sk, -1).astype(np.int32)
    out_logq = np.where(keep_sk, logq_sk, 0.0).astype(np.float32)
    return Decoded(*_top_first(ids_sk, out_logq, top), r.astype(np.float32), span16.copy())


def _top_first(
    ids_sk: np.ndarray, logq_sk: np.ndarray, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move slot ``top[s]`` of each row to slot 0, shifting the slots before it right by one."""
    rows = np.arange(ids_sk.shape[0])
    shift_sk = np.arange(1, ids_sk.shape[1]) <= top[:, None]  # slots 1..k-1 that take j - 1
    out = []
    for x in (ids_sk, logq_sk):
        y = np.empty_like(x)
        y[:, 0] = x[rows, top]
        y[:, 1:] = np.where(shift_sk, x[:, :-1], x[:, 1:])
        out.append(y)
    return out[0], out[1]


def _rescale(l_sk: np.ndarray, counts: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``log q^ = l + log((1 - r) / sum exp(l))`` per row (float64; rows without ids, or with
    r = 1, keep ``l``)."""
    has = counts > 0
    peak = np.where(has, l_sk.max(1), 0.0)
    mass = np.exp(l_sk - peak[:, None]).sum(1)
    ok = has & (r < 1.0)
    shift = np.zeros_like(r)
    shift[ok] = np.log1p(-r[ok]) - peak[ok] - np.log(mass[ok])
    return l_sk + shift[:, None]
