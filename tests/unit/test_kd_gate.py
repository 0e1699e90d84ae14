"""The token-level KD gate (no TP) against the float64 references; its flags' checks.

Dense (PyTorch fused sweep, several row chunks) and sparse losses, both gate kinds, with a
threshold in the middle of the tokens' statistic (a mixed case); a threshold that gates every
token on equals the ungated loss, one that gates every token off equals plain CE (w = 0).
The TP 2 / 4 cases run in tests/distributed/test_kd_loss_tp.py, the Triton path in
tests/unit/test_kd_loss_triton.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.loss import (
    KDGate,
    kd_cross_entropy,
    reference_kd_loss,
    reference_sparse_kd_loss,
    sparse_kd_cross_entropy,
)
from salt_megatron.loss.reference import sparse_target_distribution
from tests.unit.test_sparse_kd import sparse_targets

common = importlib.import_module("salt_megatron.loss.common")

V, V_TRUE, K = 301, 290, 8
STAT_NAMES = ("kd", "ce", "top1_agree", "kd_on")


def gate_inputs(dtype: torch.dtype, n_tok: int = 24, v: int = V, seed: int = 3):
    """``[n_tok, v]`` logits whose teacher rows range from flat to peaked (top-1 probability
    from ~1/v to ~1), labels (one ignored) and a mask (one token dropped)."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n_tok, v, generator=gen) * 3).to(dtype)
    sharp = torch.linspace(0.2, 8.0, n_tok)[torch.randperm(n_tok, generator=gen)]
    t = (torch.randn(n_tok, v, generator=gen) * sharp.unsqueeze(-1)).to(dtype)
    y = torch.randint(0, v, (n_tok,), generator=gen)
    y[:4] = t[:4].float().argmax(-1)  # confident teachers right on the label
    y[5] = -100
    mask = torch.ones(n_tok)
    mask[6] = 0.0
    return s, t, y, mask


def teacher_statistic(g_nv: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Float64 per token: top-1 probability or label loss of the teacher distribution ``g``."""
    if kind == "teacher-confidence":
        return g_nv.amax(-1)
    return -torch.log(g_nv.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1))


def mixed_threshold(stat_n: torch.Tensor) -> float:
    """Midway between the two middle finite values (well away from every token's value)."""
    vals = stat_n[torch.isfinite(stat_n)].sort().values
    mid = vals.numel() // 2
    lo, hi = float(vals[mid - 1]), float(vals[mid])
    assert hi - lo > 1e-3 * max(abs(hi), 1e-3), (lo, hi)
    return 0.5 * (lo + hi)


def check_against(loss, stats, grad, ref, grad64, dtype) -> None:
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(grad.double(), grad64, rtol=tol, atol=tol)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=1e-5, atol=1e-5)


def _dense(s, t, y, mask, w, temp, gate, upstream):
    leaf = s.clone().requires_grad_()
    loss, stats = kd_cross_entropy(
        leaf, t, y, w, temp, t2_scaling=True, loss_mask=mask, return_stats=True, gate=gate,
        impl="torch",
    )  # fmt: skip
    (loss * upstream).sum().backward()
    assert leaf.grad is not None
    return loss, stats, leaf.grad


def _dense_ref(s, t, y, mask, w, temp, gate, upstream):
    s64 = s.double().requires_grad_()
    ref = reference_kd_loss(s64, t, y, w, temp, t2_scaling=True, loss_mask=mask, gate=gate)
    (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
    return ref, grad64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["teacher-confidence", "teacher-label-loss"])
def test_dense_gate_matches_reference(monkeypatch, dtype, temp, kind):
    monkeypatch.setattr(common, "CPU_CHUNK_ELEMS", 5 * V)  # several row chunks
    s, t, y, mask = gate_inputs(dtype)
    q64 = torch.softmax(t.double() / temp, dim=-1)
    gate = KDGate(kind, mixed_threshold(teacher_statistic(q64, y, kind)))
    upstream = torch.rand(y.shape) + 0.5
    loss, stats, grad = _dense(s, t, y, mask, 0.4, temp, gate, upstream)
    ref, grad64 = _dense_ref(s, t, y, mask, 0.4, temp, gate, upstream)
    check_against(loss, stats, grad, ref, grad64, dtype)
    on = stats.kd_on[mask > 0]
    assert 0 < on.sum() < on.numel()  # a mixed case


@pytest.mark.parametrize("kind", ["teacher-confidence", "teacher-label-loss"])
def test_dense_gate_all_on_is_ungated_all_off_is_plain_ce(kind):
    s, t, y, mask = gate_inputs(torch.float32)
    upstream = torch.rand(y.shape) + 0.5
    everything = 1e-9 if kind == "teacher-confidence" else 1e9  # every token on
    nothing = 1.0 if kind == "teacher-confidence" else 1e-9  # every token off
    ungated = _dense(s, t, y, mask, 0.4, 2.0, None, upstream)
    plain = _dense(s, t, y, mask, 0.0, 2.0, None, upstream)
    all_on = _dense(s, t, y, mask, 0.4, 2.0, KDGate(kind, everything), upstream)
    all_off = _dense(s, t, y, mask, 0.4, 2.0, KDGate(kind, nothing), upstream)
    label_on = (y != -100).float() if kind == "teacher-label-loss" else 1.0
    assert torch.equal(all_on[1].kd_on, mask * label_on)
    assert torch.equal(all_off[1].kd_on, torch.zeros_like(mask))
    if kind == "teacher-confidence":  # the ignored label is on: the ungated loss exactly
        assert torch.equal(all_on[0], ungated[0]) and torch.equal(all_on[2], ungated[2])
    else:  # the token with an ignored label has no loss at all; the rest is ungated
        keep = y != -100
        assert torch.equal(all_on[0][keep], ungated[0][keep]) and all_on[0][~keep].eq(0).all()
        assert torch.equal(all_on[2][keep], ungated[2][keep]) and all_on[2][~keep].eq(0).all()
    assert torch.equal(all_off[0], plain[0]) and torch.equal(all_off[2], plain[2])
    ref, grad64 = _dense_ref(s, t, y, mask, 0.0, 2.0, None, upstream)
    torch.testing.assert_close(all_off[0].double(), ref["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_off[2].double(), grad64, rtol=1e-6, atol=1e-6)


def _sparse_case(dtype, temp, residual, gate_of, upstream):
    """Sparse loss and its reference with ``gate_of(teacher_g64, y)``'s gate."""
    s, t, y, mask = gate_inputs(dtype, v=V)
    t = t[:, :V_TRUE].float()
    y = y.clamp(max=V_TRUE - 1)
    ids, logp, resid = sparse_targets(t, temp, K)
    g64 = sparse_target_distribution(ids, logp, resid, V, V_TRUE, "uniform")
    gate = gate_of(g64, y)
    leaf = s.clone().requires_grad_()
    loss, stats = sparse_kd_cross_entropy(
        leaf, ids, logp, resid, y, 0.4, temp, residual=residual, vocab_size=V_TRUE,
        t2_scaling=True, loss_mask=mask, return_stats=True, gate=gate,
    )  # fmt: skip
    (loss * upstream).sum().backward()
    s64 = s.double().requires_grad_()
    ref = reference_sparse_kd_loss(
        s64, ids, logp, resid, y, 0.4, temp, residual=residual, vocab_size=V_TRUE,
        t2_scaling=True, loss_mask=mask, gate=gate,
    )  # fmt: skip
    (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
    assert leaf.grad is not None
    return loss, stats, leaf.grad, ref, grad64, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["uniform", "drop"])
@pytest.mark.parametrize("kind", ["teacher-confidence", "teacher-label-loss"])
def test_sparse_gate_matches_reference(monkeypatch, dtype, residual, kind):
    monkeypatch.setattr(common, "CPU_CHUNK_ELEMS", 5 * V)
    upstream = torch.rand(24) + 0.5

    def gate_of(g64, y):
        return KDGate(kind, mixed_threshold(teacher_statistic(g64, y, kind)))

    loss, stats, grad, ref, grad64, mask = _sparse_case(dtype, 2.0, residual, gate_of, upstream)
    check_against(loss, stats, grad, ref, grad64, dtype)
    on = stats.kd_on[mask > 0]
    assert 0 < on.sum() < on.numel()


def test_sparse_gate_all_on_is_ungated_all_off_is_plain_ce():
    upstream = torch.rand(24) + 0.5
    runs = {}
    for name, gate in (("none", None), ("on", KDGate("teacher-confidence", 1e-9)),
                       ("off", KDGate("teacher-confidence", 1.0))):  # fmt: skip
        runs[name] = _sparse_case(
            torch.float32, 1.0, "uniform", lambda g, y, gate=gate: gate, upstream
        )
    assert torch.equal(runs["on"][0], runs["none"][0]) and torch.equal(
        runs["on"][2], runs["none"][2]
    )
    assert runs["off"][1].kd_on.eq(0).all()
    _, _, _, _, _, mask = runs["off"]
    s, t, y, _ = gate_inputs(torch.float32, v=V)
    s64 = s.double().requires_grad_()
    plain = reference_kd_loss(s64, t, y.clamp(max=V_TRUE - 1), 0.0, loss_mask=mask)
    (grad64,) = torch.autograd.grad((plain["loss"] * upstream.double()).sum(), s64)
    torch.testing.assert_close(runs["off"][0].double(), plain["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs["off"][2].double(), grad64, rtol=1e-6, atol=1e-6)


BASE = ["--mock-data", "--kd-teacher-load", "/t", "--kd-steps", "5"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kd-gate", "teacher-confidence"], "teacher-confidence needs --kd-gate-threshold"),
        (["--kd-gate", "teacher-confidence", "--kd-gate-threshold", "1.5"], "a probability in"),
        (["--kd-gate", "teacher-confidence", "--kd-gate-threshold", "0"], "a probability in"),
        (["--kd-gate", "teacher-label-loss", "--kd-gate-threshold", "-1"], "finite nats > 0"),
        (["--kd-gate-threshold", "0.5"], "--kd-gate-threshold 0.5 needs --kd-gate"),
    ],
)
def test_gate_flags_are_checked(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config([*BASE, *argv])


def test_gate_needs_a_kd_phase():
    with pytest.raises(ConfigError, match="--kd-gate teacher-confidence needs a KD phase"):
        parse_config(
            ["--mock-data", "--kd-gate", "teacher-confidence", "--kd-gate-threshold", "0.5"]
        )
    cfg = parse_config([*BASE, "--kd-gate", "teacher-label-loss", "--kd-gate-threshold", "2"])
    assert (cfg.distill.kd_gate, cfg.distill.kd_gate_threshold) == ("teacher-label-loss", 2.0)
