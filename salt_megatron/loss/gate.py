"""Token-level KD gate: the KD term applies only on tokens where the teacher is "easy".

SALT's argument is that a small teacher helps on the regions it already models well. Per token,
with the teacher's distribution ``q = softmax(t / T)`` (the one the KD term uses)::

    teacher-confidence:   on  iff  max_v q_v >= P                 (0 < P <= 1)
    teacher-label-loss:   on  iff  -log q_y <= L  and y is a label (L > 0 nats)

    loss = (1 - w on) CE + w c on KD        (on = 1 everywhere: the ungated loss)

so a gated-off token trains on its label alone, with weight 1 (plain next-token CE), and its
gradient is ``softmax(s) - onehot(y)``. The gate is a per-row constant: no gradient flows
through it.

Both statistics come from quantities the fused losses already have. Dense teacher logits: with
the global row maximum ``M_t`` and ``Z_t = sum_v exp((t_v - M_t) / T)`` (both from the loss's
existing collectives), ``max_v q_v = 1 / Z_t`` and ``log q_y = (t_y - M_t) / T - log Z_t``; the
label logit ``t_y`` rides in the existing SUM all-reduce. Stored sparse targets (top-k ids,
log-probabilities at T, residual ``r``): the teacher's distribution as the uniform residual
reconstructs it, ``q_k`` at the ``n`` stored ids and ``r / (V - n)`` at every other id, whatever
``--kd-residual`` says; per token and local (the targets are replicated over the TP group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from salt_megatron.loss.common import TokenWeights

GateKind = Literal["teacher-confidence", "teacher-label-loss"]


@dataclass(frozen=True)
class KDGate:
    """Which tokens get the KD term: ``kind`` and its ``threshold`` (a probability in (0, 1]
    for teacher-confidence, nats > 0 for teacher-label-loss)."""

    kind: GateKind
    threshold: float

    def __post_init__(self) -> None:
        if self.kind == "teacher-confidence":
            ok = 0.0 < self.threshold <= 1.0
        elif self.kind == "teacher-label-loss":
            ok = 0.0 < self.threshold < math.inf
        else:
            raise ValueError(f"unknown KD gate {self.kind!r}")
        if not ok:
            raise ValueError(f"KD gate {self.kind}: threshold {self.threshold} out of range")

    @property
    def needs_label(self) -> bool:
        """True when the gate reads the teacher's probability of the label."""
        return self.kind == "teacher-label-loss"

    def on(
        self, top1_logq_n: torch.Tensor, label_logq_n: torch.Tensor | None, valid_n: torch.Tensor
    ) -> torch.Tensor:
        """Float32 ``[N]``: 1.0 where the KD term applies, else 0.0.

        ``top1_logq_n``: the teacher's ``log max_v q_v``; ``label_logq_n``: its ``log q_y``
        (needed by teacher-label-loss); ``valid_n``: bool, the label is not ignored.
        """
        if self.kind == "teacher-confidence":
            return (top1_logq_n >= math.log(self.threshold)).float()
        assert label_logq_n is not None
        return (valid_n & (-label_logq_n <= self.threshold)).float()


def from_flags(kind: str, threshold: float | None) -> KDGate | None:
    """The gate of ``--kd-gate``/``--kd-gate-threshold`` (None for ``"none"``)."""
    if kind == "none":
        return None
    if threshold is None:
        raise ValueError(f"--kd-gate {kind} needs --kd-gate-threshold")
    return KDGate(kind, float(threshold))  # type: ignore[arg-type]


def dense_teacher_logq(
    tmax_n: torch.Tensor, zt_n: torch.Tensor, ty_n: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log max_v q_v, log q_y or None)`` from the teacher's global row maximum ``M_t``, its
    partition sum ``Z_t`` at T and its label logit ``t_y`` (all float32 ``[N]``)."""
    log_zt_n = torch.log(zt_n)
    if ty_n is None:
        return -log_zt_n, None
    return -log_zt_n, (ty_n - tmax_n) / temperature - log_zt_n


def sparse_teacher_logq(
    ids_nk: torch.Tensor,
    logq_nk: torch.Tensor,
    resid_n: torch.Tensor,
    labels_n: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log max_v q_v, log q_y)`` of stored targets (``[N, K]`` global ids, -1 for none, and
    log-probabilities at T; ``[N]`` residual mass and labels), float32 ``[N]``: stored ``q_k``
    at the stored ids, ``r / (V - n)`` at the others (-inf when nothing is left)."""
    present_nk = ids_nk >= 0
    logq_nk = torch.where(present_nk, logq_nk.float(), -math.inf)
    rest_n = (vocab_size - present_nk.sum(-1)).float()
    log_u_n = torch.log(resid_n.float().clamp(min=0.0)) - torch.log(rest_n)
    log_u_n = torch.where(rest_n > 0, log_u_n, -math.inf)
    top1_n = torch.maximum(logq_nk.amax(-1), log_u_n)
    at_label_nk = present_nk & torch.eq(ids_nk, labels_n.unsqueeze(-1))
    stored_n = torch.where(at_label_nk, logq_nk, -math.inf).amax(-1)
    return top1_n, torch.where(at_label_nk.any(-1), stored_n, log_u_n)


def gated_weights(
    keep_n: torch.Tensor, akd_n: torch.Tensor, on_n: torch.Tensor, kd_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CE and KD gradient weights ``(keep (1 - w on), akd on)`` of gated rows (any shape)."""
    return keep_n * (1.0 - kd_weight * on_n), akd_n * on_n


def gate_tokens(tok: TokenWeights, on_n: torch.Tensor, kd_weight: float) -> TokenWeights:
    """``tok`` with the gate ``on_n`` (float 0/1 ``[N]``) applied to its gradient weights."""
    ace_n, akd_n = gated_weights(tok.keep, tok.akd, on_n, kd_weight)
    return tok._replace(ace=ace_n, akd=akd_n, on=on_n)
