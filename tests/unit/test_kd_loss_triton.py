"""The Triton kernels under TRITON_INTERPRET=1 against the float64 reference (CPU), with and
without a token-level KD gate.

Triton reads TRITON_INTERPRET when it is imported, so the checks run in a fresh subprocess
(this file executed as a script): other tests in this pytest process are not affected.
"""

from __future__ import annotations

import os
import subprocess
import sys

V = 700  # several 256-column blocks plus a partial one


def _check(dtype_name: str, w: float, temp: float) -> None:
    import torch

    from salt_megatron.loss import kd_cross_entropy, reference_kd_loss

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(7)
    s = (torch.randn(2, 3, V, generator=gen) * 3).to(dtype)
    t = (torch.randn(2, 3, V, generator=gen) * 3).to(dtype)
    s[1, 0] = torch.randint(0, 2, (V,), generator=gen).to(dtype)  # tied maxima in one row
    t[1, 0] = s[1, 0]
    y = torch.randint(0, V, (2, 3), generator=gen)
    y[0, 1] = -100
    mask = torch.ones(2, 3)
    mask[1, 2] = 0.0
    s_leaf = s.clone().requires_grad_()
    loss, stats = kd_cross_entropy(
        s_leaf, t, y, w, temp, t2_scaling=True, loss_mask=mask, return_stats=True, impl="triton"
    )
    loss.sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference_kd_loss(s64, t, y, w, temp, t2_scaling=True, loss_mask=mask)
    (grad64,) = torch.autograd.grad(ref["loss"].sum(), s64)
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert s_leaf.grad is not None
    torch.testing.assert_close(s_leaf.grad.double(), grad64, rtol=tol, atol=tol)
    for name in ("kd", "ce", "top1_agree", "kd_on"):
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=1e-5, atol=1e-5)
    # in-place gradient through the Triton kernel equals the out-of-place one
    buf = s.clone()
    loss_ip = kd_cross_entropy(
        buf.requires_grad_(), t, y, w, temp, impl="triton", inplace_grad=True
    )
    (grad_ip,) = torch.autograd.grad(loss_ip.sum(), buf)
    plain = s.clone().requires_grad_()
    (grad_plain,) = torch.autograd.grad(kd_cross_entropy(plain, t, y, w, temp).sum(), plain)
    torch.testing.assert_close(grad_ip, grad_plain, rtol=tol, atol=tol)


def _check_gate(kind: str, temp: float) -> None:
    """A mixed token-level KD gate through the Triton kernels equals the float64 reference."""
    import torch

    from salt_megatron.loss import KDGate, kd_cross_entropy, reference_kd_loss
    from tests.unit.test_kd_gate import (
        check_against,
        gate_inputs,
        mixed_threshold,
        teacher_statistic,
    )

    s, t, y, mask = gate_inputs(torch.float32, n_tok=10, v=V)
    q64 = torch.softmax(t.double() / temp, dim=-1)
    gate = KDGate(kind, mixed_threshold(teacher_statistic(q64, y, kind)))  # type: ignore[arg-type]
    leaf = s.clone().requires_grad_()
    loss, stats = kd_cross_entropy(
        leaf, t, y, 0.4, temp, loss_mask=mask, return_stats=True, impl="triton", gate=gate
    )
    loss.sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference_kd_loss(s64, t, y, 0.4, temp, loss_mask=mask, gate=gate)
    (grad64,) = torch.autograd.grad(ref["loss"].sum(), s64)
    check_against(loss, stats, leaf.grad, ref, grad64, torch.float32)
    assert 0 < stats.kd_on.sum() < mask.sum()


def _main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for dtype_name, w, temp in [
        ("float32", 0.3, 1.0),
        ("bfloat16", 0.3, 2.0),
        ("float32", 1.0, 2.0),
    ]:
        _check(dtype_name, w, temp)
    _check_gate("teacher-label-loss", 2.0)
    print("triton-interpreter-ok")


def test_triton_path_matches_reference_under_interpreter():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}  # the script imports tests.*
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton-interpreter-ok" in proc.stdout


if __name__ == "__main__":
    _main()
