"""Dense float64 reference of the SALT loss (tests only: it materialises the full vocabulary).

Same definitions as :func:`salt_megatron.loss.kd_cross_entropy` (see ``docs`` there)::

    p = softmax(s / T), q = softmax(t / T)
    KD = -sum_v q_v log p_v             CE = logsumexp(s) - s_y   (0 where y == ignore_index)
    loss = mask * ((1 - w) * CE + w * c * KD),   c = T**2 if t2_scaling else 1
"""

from __future__ import annotations

import torch


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
        agrees), the last three multiplied by the mask like the loss.
    """
    s_nv = student_logits.double()
    t_nv = teacher_logits.double()
    logp_nv = torch.log_softmax(s_nv / temperature, dim=-1)
    q_nv = torch.softmax(t_nv / temperature, dim=-1)
    kd_n = -(q_nv * logp_nv).sum(-1)
    valid_n = labels != ignore_index
    safe_y_n = torch.where(valid_n, labels, torch.zeros_like(labels))
    ce_n = torch.logsumexp(s_nv, dim=-1) - s_nv.gather(-1, safe_y_n.unsqueeze(-1)).squeeze(-1)
    ce_n = torch.where(valid_n, ce_n, torch.zeros_like(ce_n))
    scale = temperature**2 if t2_scaling else 1.0
    loss_n = (1.0 - kd_weight) * ce_n + kd_weight * scale * kd_n
    agree_n = (s_nv.argmax(-1) == t_nv.argmax(-1)).double()
    mask_n = torch.ones_like(kd_n) if loss_mask is None else loss_mask.double()
    return {
        "loss": loss_n * mask_n,
        "kd": kd_n * mask_n,
        "ce": ce_n * mask_n,
        "top1_agree": agree_n * mask_n,
    }
