"""kd_cross_entropy (PyTorch path, no TP) against the dense float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from salt_megatron.loss import kd_cross_entropy, reference_kd_loss

common = importlib.import_module("salt_megatron.loss.common")

V = 301  # odd width: exercises partial chunks


def _inputs(dtype: torch.dtype, seed: int = 0, shape: tuple[int, ...] = (3, 7)):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, V, generator=gen) * 3).to(dtype)
    t = (torch.randn(*shape, V, generator=gen) * 3).to(dtype)
    y = torch.randint(0, V, shape, generator=gen)
    y.view(-1)[1] = -100
    y.view(-1)[4] = -100
    mask = torch.ones(shape)
    mask.view(-1)[2] = 0.0
    mask.view(-1)[4] = 0.0
    return s, t, y, mask


def _reference(s, t, y, mask, w, temp, t2, upstream):
    s64 = s.detach().double().requires_grad_()
    ref = reference_kd_loss(s64, t, y, w, temp, t2_scaling=t2, loss_mask=mask)
    (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
    return ref, grad64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("t2", [False, True])
def test_loss_grad_stats_match_reference(monkeypatch, dtype, w, temp, t2):
    monkeypatch.setattr(common, "CPU_CHUNK_ELEMS", 4 * V)  # several row chunks
    s, t, y, mask = _inputs(dtype)
    upstream = torch.rand(y.shape) + 0.5
    s_leaf = s.clone().requires_grad_()
    loss, stats = kd_cross_entropy(
        s_leaf, t, y, w, temp, t2_scaling=t2, loss_mask=mask, return_stats=True, impl="torch"
    )
    (loss * upstream).sum().backward()
    ref, grad64 = _reference(s, t, y, mask, w, temp, t2, upstream)
    assert loss.dtype == torch.float32 and loss.shape == y.shape
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    grad_tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: the gradient is stored in bf16
    assert s_leaf.grad is not None and s_leaf.grad.dtype == dtype
    torch.testing.assert_close(s_leaf.grad.double(), grad64, rtol=grad_tol, atol=grad_tol)
    for name in ("kd", "ce", "top1_agree"):
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=1e-5, atol=1e-5)


def test_ignore_index_drops_ce_only_and_mask_drops_everything():
    s, t, y, _ = _inputs(torch.float32)
    s = s.requires_grad_()
    mask = torch.ones(y.shape)
    mask.view(-1)[2] = 0.0
    loss, stats = kd_cross_entropy(s, t, y, 0.5, 2.0, loss_mask=mask, return_stats=True)
    loss.sum().backward()
    assert s.grad is not None
    grad_nv = s.grad.view(-1, V)
    assert stats.ce.view(-1)[1] == 0 and stats.kd.view(-1)[1] > 0  # ignored label: KD stays
    assert loss.view(-1)[1].item() == pytest.approx(0.5 * stats.kd.view(-1)[1].item(), rel=1e-6)
    assert grad_nv[1].abs().sum() > 0
    assert loss.view(-1)[2] == 0 and grad_nv[2].abs().sum() == 0  # masked: nothing
    assert stats.kd.view(-1)[2] == 0 and stats.top1_agree.view(-1)[2] == 0


def test_top1_agreement_with_ties_uses_lowest_index():
    gen = torch.Generator().manual_seed(3)
    s = torch.randint(0, 3, (64, V), generator=gen).float()  # many tied maxima per row
    t = torch.randint(0, 3, (64, V), generator=gen).float()
    t[:8] = s[:8]  # identical rows agree
    y = torch.randint(0, V, (64,), generator=gen)
    _, stats = kd_cross_entropy(s, t, y, 0.5, return_stats=True)
    ref = reference_kd_loss(s, t, y, 0.5)
    assert torch.equal(stats.top1_agree.double(), ref["top1_agree"])
    assert stats.top1_agree[:8].eq(1).all() and ref["top1_agree"].sum() < 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_writes_into_student_buffer(dtype):
    s, t, y, mask = _inputs(dtype, seed=1)
    plain = s.clone().requires_grad_()
    loss_a, stats_a = kd_cross_entropy(plain, t, y, 0.4, 2.0, loss_mask=mask, return_stats=True)
    loss_a.sum().backward()
    leaf = s.clone().requires_grad_()
    buffer = leaf * 1.0  # non-leaf logits, as produced by an output layer
    loss_b, stats_b = kd_cross_entropy(
        buffer, t, y, 0.4, 2.0, loss_mask=mask, return_stats=True, inplace_grad=True
    )
    assert torch.equal(loss_a, loss_b) and torch.equal(stats_a.top1_agree, stats_b.top1_agree)
    loss_b.sum().backward()
    assert plain.grad is not None and leaf.grad is not None
    torch.testing.assert_close(leaf.grad, plain.grad, rtol=0, atol=0)
    assert torch.equal(buffer.detach(), plain.grad)  # the logits buffer now holds the gradient
    with pytest.raises(ValueError, match="contiguous"):
        kd_cross_entropy(s.transpose(0, 1), t.transpose(0, 1), y.t(), 0.4, inplace_grad=True)


def test_non_contiguous_inputs_are_handled():
    s, t, y, mask = _inputs(torch.float32, seed=2)
    s_t = s.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, strided
    assert not s_t.is_contiguous()
    t_t = t.transpose(0, 1).contiguous().transpose(0, 1)
    loss_nc = kd_cross_entropy(s_t, t_t, y, 0.3, 2.0, loss_mask=mask)
    loss_nc.sum().backward()
    ref, grad64 = _reference(s, t, y, mask, 0.3, 2.0, False, torch.ones(y.shape))
    torch.testing.assert_close(loss_nc.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    assert s_t.grad is not None
    torch.testing.assert_close(s_t.grad.double(), grad64, rtol=1e-6, atol=1e-6)


def test_invalid_arguments_are_refused():
    s, t, y, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        kd_cross_entropy(s, t[..., :-1], y, 0.5)
    with pytest.raises(ValueError, match="leading"):
        kd_cross_entropy(s, t, y[:, :-1], 0.5)
    with pytest.raises(ValueError, match="kd_weight"):
        kd_cross_entropy(s, t, y, 1.5)
    with pytest.raises(ValueError, match="impl"):
        kd_cross_entropy(s, t, y, 0.5, impl="cuda")
    with pytest.raises(TypeError, match="float32"):
        kd_cross_entropy(s.double(), t.double(), y, 0.5)
