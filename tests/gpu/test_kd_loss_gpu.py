"""CUDA-only: the Triton and PyTorch paths of kd_cross_entropy against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from salt_megatron.loss import kd_cross_entropy, reference_kd_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_cuda_paths_match_reference(impl, dtype, temp):
    gen = torch.Generator().manual_seed(0)
    width = 9001
    s = (torch.randn(32, width, generator=gen) * 3).to(dtype)
    t = (torch.randn(32, width, generator=gen) * 3).to(dtype)
    t[:4] = s[:4]
    y = torch.randint(0, width, (32,), generator=gen)
    y[5] = -100
    mask = torch.ones(32)
    mask[6] = 0.0
    s64 = s.double().requires_grad_()
    ref = reference_kd_loss(s64, t, y, 0.3, temp, t2_scaling=True, loss_mask=mask)
    (g64,) = torch.autograd.grad(ref["loss"].sum(), s64)
    sc = s.cuda().requires_grad_()
    loss, stats = kd_cross_entropy(
        sc, t.cuda(), y.cuda(), 0.3, temp, t2_scaling=True, loss_mask=mask.cuda(),
        return_stats=True, impl=impl,
    )  # fmt: skip
    loss.sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(loss.double().cpu(), ref["loss"], rtol=1e-5, atol=1e-5)
    assert sc.grad is not None
    torch.testing.assert_close(sc.grad.double().cpu(), g64, rtol=tol, atol=tol)
    for name in ("kd", "ce", "top1_agree"):
        got = getattr(stats, name).double().cpu()
        torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_paths_never_synchronise(impl):
    """CUDA's sync debug mode raises on any device->host synchronisation in forward or backward."""
    gen = torch.Generator().manual_seed(1)
    s = (torch.randn(64, 4096, generator=gen) * 3).cuda().bfloat16().requires_grad_()
    t = (torch.randn(64, 4096, generator=gen) * 3).cuda().bfloat16()
    y = torch.randint(0, 4096, (64,), generator=gen).cuda()
    mask = torch.ones(64, device="cuda")
    kd_cross_entropy(s, t, y, 0.5, 2.0, loss_mask=mask, impl=impl).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = kd_cross_entropy(
            s, t, y, 0.5, 2.0, loss_mask=mask, return_stats=True, impl=impl
        )
        (loss * mask).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).all() and torch.isfinite(stats.kd).all() and s.grad is not None
