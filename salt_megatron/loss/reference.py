"""Dense float64 references of the SALT losses (tests only: they materialise the full vocabulary).

Same definitions as :func:`salt_megatron.loss.kd_cross_entropy` (see ``docs`` there)::

    p = softmax(s / T), q = softmax(t / T)
    KD = -sum_v q_v log p_v             CE = logsumexp(s) - s_y   (0 where y == ignore_index)
    loss = mask * ((1 - w) * CE + w * c * KD),   c = T**2 if t2_scaling else 1

With a KD gate, ``on`` = 1 where the teacher's distribution ``g`` (``q``; for sparse targets its
uniform-residual reconstruction) passes it: ``max_v g_v >= P`` (teacher-confidence) or
``-log g_y <= L`` with a label (teacher-label-loss); ``loss = (1 - w on) CE + w c on KD``.
"""

from __future__ import annotations

import torch

from salt_megatron.loss.gate import KDGate


def reference_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    *,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    gate: KDGate | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token loss and statistics on full-vocabulary logits, all in float64.

    Args:
        student_logits: ``[..., V]`` full vocabulary, any float dtype (upcast to float64; autograd
            flows through, so ``torch.autograd.grad`` of ``loss`` gives the reference gradient).
        teacher_logits: ``[..., V]``.
        labels: ``[...]`` int64, ``ignore_index`` zeroes the CE term only.
        loss_mask: ``[...]`` 0/1 floats or None; multiplies loss and statistics.

    Returns:
        dict of float64 ``[...]`` tensors: ``loss``, ``kd`` (raw KD, no weight and no T^2),
        ``ce`` (0 where ignored), ``top1_agree`` (1.0 where the first argmax of both models
        agrees), ``kd_on`` (1.0 where ``gate`` lets the KD term apply), the last four
        multiplied by the mask like the loss.
    """
    s_nv = student_logits.double()
    t_nv = teacher_logits.double()
    logp_nv = torch.log_softmax(s_nv / temperature, dim=-1)
    q_nv = torch.softmax(t_nv / temperature, dim=-1)
    kd_n = -(q_nv * logp_nv).sum(-1)
    agree_n = (s_nv.argmax(-1) == t_nv.argmax(-1)).double()
    scale = temperature**2 if t2_scaling else 1.0
    on_n = _gate_on(q_nv.detach(), labels, gate, ignore_index)
    return _with_ce(s_nv, kd_n, agree_n, on_n, labels, kd_weight, scale, loss_mask, ignore_index)


def _gate_on(
    g_nv: torch.Tensor, labels: torch.Tensor, gate: KDGate | None, ignore_index: int
) -> torch.Tensor:
    """Float64 ``[...]``: 1.0 where ``gate`` passes the teacher distribution ``g_nv``."""
    if gate is None:
        return torch.ones(g_nv.shape[:-1], dtype=torch.float64)
    if gate.kind == "teacher-confidence":
        return (g_nv.amax(-1) >= gate.threshold).double()
    valid_n = labels != ignore_index
    g_y_n = g_nv.gather(-1, torch.where(valid_n, labels, 0).unsqueeze(-1)).squeeze(-1)
    return (valid_n & (-torch.log(g_y_n) <= gate.threshold)).double()


def _with_ce(
    s_nv: torch.Tensor,
    kd_n: torch.Tensor,
    agree_n: torch.Tensor,
    on_n: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    scale: float,
    loss_mask: torch.Tensor | None,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    """Add the float64 CE term to a KD term; mask everything (the references' return value)."""
    valid_n = labels != ignore_index
    safe_y_n = torch.where(valid_n, labels, torch.zeros_like(labels))
    ce_n = torch.logsumexp(s_nv, dim=-1) - s_nv.gather(-1, safe_y_n.unsqueeze(-1)).squeeze(-1)
    ce_n = torch.where(valid_n, ce_n, torch.zeros_like(ce_n))
    w_n = kd_weight * on_n
    loss_n = (1.0 - w_n) * ce_n + w_n * scale * kd_n
    mask_n = torch.ones_like(kd_n) if loss_mask is None else loss_mask.double()
    return {
        "loss": loss_n * mask_n,
        "kd": kd_n * mask_n,
        "ce": ce_n * mask_n,
        "top1_agree": agree_n * mask_n,
        "kd_on": on_n * mask_n,
    }


def sparse_target_distribution(
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    width: int,
    vocab_size: int,
    residual: str = "uniform",
) -> torch.Tensor:
    """The dense float64 ``[..., width]`` target of sparse teacher targets (definitions in
    :mod:`salt_megatron.loss.sparse_kd`): ``q_k`` (``"drop"``: ``q_k / sum q``) at the kept
    ids, ``r / (V - n)`` (``"uniform"``) at every other id below ``vocab_size``."""
    present = target_ids >= 0
    q = torch.where(present, target_logprobs.double().exp(), torch.zeros((), dtype=torch.float64))
    ids = torch.where(present, target_ids.long(), torch.zeros_like(target_ids.long()))
    lead = target_ids.shape[:-1]
    dense = torch.zeros(*lead, width, dtype=torch.float64)
    # a count, not a bool scatter: empty slots point at id 0 too, and scatter_ of duplicate
    # indices keeps an arbitrary one of their values (a stored id 0 could read as not kept)
    kept = torch.zeros(*lead, width, dtype=torch.int64).scatter_add(-1, ids, present.long()) > 0
    if residual == "drop":
        q = q / q.sum(-1, keepdim=True).clamp(min=1e-300)
    else:
        rest = (vocab_size - present.sum(-1)).double()
        u = torch.where(rest > 0, target_residual.double() / rest.clamp(min=1), 0.0)
        dense[..., :vocab_size] = u.unsqueeze(-1).expand(*lead, vocab_size).clone()
        dense = dense.masked_fill(kept, 0.0)
    return dense.scatter_add(-1, ids, q)


def reference_sparse_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    *,
    residual: str = "uniform",
    vocab_size: int | None = None,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    gate: KDGate | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token loss and statistics against sparse targets, densely in float64.

    ``student_logits`` ``[..., V]`` (full vocabulary, autograd flows through); the sparse
    targets become a dense distribution (:func:`sparse_target_distribution`) and
    ``KD = -sum_v target_v log softmax(s / T)_v``. Returns the same keys as
    :func:`reference_kd_loss`; ``top1_agree`` compares the student's first argmax with
    ``target_ids[..., 0]``; ``gate`` reads the ``"uniform"`` reconstruction of the teacher.
    """
    s_nv = student_logits.double()
    width = s_nv.shape[-1]
    target = sparse_target_distribution(
        target_ids, target_logprobs, target_residual, width, vocab_size or width, residual
    )
    kd_n = -(target * torch.log_softmax(s_nv / temperature, dim=-1)).sum(-1)
    agree_n = (s_nv.argmax(-1) == target_ids[..., 0].long()).double()
    scale = temperature**2 if t2_scaling else 1.0
    teacher = sparse_target_distribution(
        target_ids, target_logprobs, target_residual, width, vocab_size or width, "uniform"
    )
    on_n = _gate_on(teacher, labels, gate, ignore_index)
    return _with_ce(s_nv, kd_n, agree_n, on_n, labels, kd_weight, scale, loss_mask, ignore_index)
