"""sparse_kd_cross_entropy (no TP) against the dense float64 reference and the dense KD loss."""

from __future__ import annotations

import importlib

import pytest
import torch

from salt_megatron.loss import (
    kd_cross_entropy,
    reference_sparse_kd_loss,
    sparse_kd_cross_entropy,
)

common = importlib.import_module("salt_megatron.loss.common")

V, V_TRUE, K = 301, 290, 8  # 11 padding columns; odd width: partial chunks


def sparse_targets(
    t: torch.Tensor, temp: float, k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (int32), log-probabilities and residual of teacher logits ``t`` ``[..., V_TRUE]``,
    with some slots emptied (as top-p leaves them) and one token without any target."""
    logq = torch.log_softmax(t.double() / temp, dim=-1)
    top = logq.topk(k, dim=-1)
    ids, logp = top.indices.to(torch.int32), top.values.float()
    gen = torch.Generator().manual_seed(seed)
    cut = torch.randint(1, k + 1, ids.shape[:-1], generator=gen)
    ids = torch.where(torch.arange(k) < cut.unsqueeze(-1), ids, -1)
    ids.view(-1, k)[3] = -1  # a token without targets: only its CE term remains
    kept = torch.where(ids >= 0, top.values.exp(), 0.0).sum(-1)
    return ids, logp, (1.0 - kept).float()


def _inputs(dtype: torch.dtype, temp: float, seed: int = 0, shape: tuple[int, ...] = (3, 7)):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, V, generator=gen) * 3).to(dtype)
    t = torch.randn(*shape, V_TRUE, generator=gen) * 3
    y = torch.randint(0, V_TRUE, shape, generator=gen)
    y.view(-1)[1] = -100
    mask = torch.ones(shape)
    mask.view(-1)[2] = 0.0
    return s, sparse_targets(t, temp, K, seed), y, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("residual", ["uniform", "drop"])
def test_loss_grad_stats_match_reference(monkeypatch, dtype, temp, residual):
    monkeypatch.setattr(common, "CPU_CHUNK_ELEMS", 4 * V)  # several row chunks
    s, (ids, logp, resid), y, mask = _inputs(dtype, temp)
    t2 = temp != 1.0
    upstream = torch.rand(y.shape) + 0.5
    leaf = s.clone().requires_grad_()
    loss, stats = sparse_kd_cross_entropy(
        leaf, ids, logp, resid, y, 0.3, temp, residual=residual, vocab_size=V_TRUE,
        t2_scaling=t2, loss_mask=mask, return_stats=True,
    )  # fmt: skip
    (loss * upstream).sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference_sparse_kd_loss(
        s64, ids, logp, resid, y, 0.3, temp, residual=residual, vocab_size=V_TRUE,
        t2_scaling=t2, loss_mask=mask,
    )  # fmt: skip
    (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
    assert loss.dtype == torch.float32 and loss.shape == y.shape
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert leaf.grad is not None and leaf.grad.dtype == dtype
    torch.testing.assert_close(leaf.grad.double(), grad64, rtol=tol, atol=tol)
    for name in ("kd", "ce", "top1_agree"):
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=1e-5, atol=1e-5)
    assert stats.kd.view(-1)[2] == 0 and leaf.grad.view(-1, V)[2].abs().sum() == 0  # masked


@pytest.mark.parametrize("residual", ["uniform", "drop"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_all_ids_equal_the_dense_kd_loss(residual, temp):
    """k = V (every true id kept, residual 0) is the dense loss with the teacher's padding -1e30."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 5, V, generator=gen) * 3
    t = torch.randn(2, 5, V_TRUE, generator=gen) * 3
    y = torch.randint(0, V_TRUE, (2, 5), generator=gen)
    logq = torch.log_softmax(t / temp, dim=-1)
    top = logq.topk(V_TRUE, dim=-1)
    resid = torch.zeros(2, 5)
    sparse_leaf, dense_leaf = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, got_stats = sparse_kd_cross_entropy(
        sparse_leaf, top.indices.int(), top.values, resid, y, 0.6, temp, residual=residual,
        vocab_size=V_TRUE, return_stats=True,
    )  # fmt: skip
    t_padded = torch.cat([t, torch.full((2, 5, V - V_TRUE), -1e30)], dim=-1)
    want, want_stats = kd_cross_entropy(dense_leaf, t_padded, y, 0.6, temp, return_stats=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert sparse_leaf.grad is not None and dense_leaf.grad is not None
    torch.testing.assert_close(sparse_leaf.grad, dense_leaf.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_stats, want_stats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inplace_grad_and_int64_ids_give_the_same_result():
    s, (ids, logp, resid), y, mask = _inputs(torch.bfloat16, 2.0, seed=1)
    plain = s.clone().requires_grad_()
    loss_a = sparse_kd_cross_entropy(plain, ids, logp, resid, y, 0.4, 2.0, vocab_size=V_TRUE,
                                     loss_mask=mask)  # fmt: skip
    loss_a.sum().backward()
    leaf = s.clone().requires_grad_()
    buffer = leaf * 1.0
    loss_b = sparse_kd_cross_entropy(
        buffer, ids.long(), logp, resid, y, 0.4, 2.0, vocab_size=V_TRUE, loss_mask=mask,
        inplace_grad=True,
    )  # fmt: skip
    assert torch.equal(loss_a, loss_b)
    loss_b.sum().backward()
    assert plain.grad is not None and torch.equal(leaf.grad, plain.grad)
    assert torch.equal(buffer.detach(), plain.grad)


def test_invalid_arguments_are_refused():
    s, (ids, logp, resid), y, _ = _inputs(torch.float32, 1.0)
    with pytest.raises(ValueError, match=r"\[..., K\]"):
        sparse_kd_cross_entropy(s, ids, logp[..., :-1], resid, y, 0.5)
    with pytest.raises(ValueError, match="int32/int64"):
        sparse_kd_cross_entropy(s, ids.float(), logp, resid, y, 0.5)
    with pytest.raises(ValueError, match="target_residual"):
        sparse_kd_cross_entropy(s, ids, logp, resid[:, :-1], y, 0.5)
    with pytest.raises(ValueError, match="residual"):
        sparse_kd_cross_entropy(s, ids, logp, resid, y, 0.5, residual="spread")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        sparse_kd_cross_entropy(s.double(), ids, logp, resid, y, 0.5)


def test_reference_target_keeps_a_stored_id_zero_beside_empty_slots():
    """Empty slots (-1) must not unmark a stored id 0: its mass is q_0, not q_0 + u."""
    from salt_megatron.loss.reference import sparse_target_distribution

    ids = torch.tensor([[5, 0, -1, -1]])
    logq = torch.tensor([[0.5, 0.25, 0.0, 0.0]]).log()
    dense = sparse_target_distribution(ids, logq, torch.tensor([0.25]), 12, 10, "uniform")
    want = torch.tensor([0.25] + [0.25 / 8] * 4 + [0.5] + [0.25 / 8] * 4 + [0.0] * 2)
    torch.testing.assert_close(dense[0], want.double(), rtol=1e-6, atol=1e-7)
