"""kd_cross_entropy and sparse_kd_cross_entropy across real gloo TP groups (world 2 and 4, one
spawn each).

Each worker builds the same full-vocabulary logits on every rank, keeps its contiguous shard,
and checks: loss, gradient shard and statistics against the dense float64 reference; w=0 against
megatron-core's vocab_parallel_cross_entropy; exactly two collectives in forward and none in
backward (a counting wrapper around every torch.distributed collective); ``teacher_scratch``
bitwise equal to a new buffer; unequal shards refused; a size-1 group (TP=1) equal to
tp_group=None. The sparse loss: against its float64 reference with padding columns on the last
shard, two collectives in forward and none in backward, and k = V equal to the dense loss; the
stored targets' top-k / top-p merge across shards equal to the one-shard result. The token-level
KD gate (dense and sparse) against the references, with the same collectives.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed

V = 64 * 12  # divisible by 1, 2, 4
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "scatter", "barrier",
)  # fmt: skip


class _CallCounter:
    """Counts calls of every torch.distributed collective while installed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _CallCounter:
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapper(*args, _name=name, _orig=original, **kwargs):  # type: ignore[no-untyped-def]
                self.calls.append(_name)
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _full_inputs(dtype: torch.dtype, n_tok: int = 24):
    gen = torch.Generator().manual_seed(11)
    s = (torch.randn(n_tok, V, generator=gen) * 3).to(dtype)
    t = (torch.randn(n_tok, V, generator=gen) * 3).to(dtype)
    s[:4] = torch.randint(0, 2, (4, V), generator=gen).to(dtype)  # ties across shards
    t[:4] = s[:4]
    t[4:6] = torch.randint(0, 2, (2, V), generator=gen).to(dtype)
    y = torch.randint(0, V, (n_tok,), generator=gen)
    y[3] = -100
    mask = torch.ones(n_tok)
    mask[5] = 0.0
    return s, t, y, mask


def _check_against_reference(group, rank: int, tp: int) -> int:
    from salt_megatron.loss import kd_cross_entropy, reference_kd_loss

    width = V // tp
    cols = slice(rank * width, (rank + 1) * width)
    n_checks = 0
    for dtype, w, temp in itertools.product(
        (torch.float32, torch.bfloat16), (0.0, 0.3, 1.0), (1.0, 2.0)
    ):
        t2 = w == 0.3  # T^2 scaling on and off, at both temperatures
        s, t, y, mask = _full_inputs(dtype)
        upstream = torch.linspace(0.5, 1.5, y.numel())
        s_shard = s[:, cols].clone().requires_grad_()
        loss, stats = kd_cross_entropy(
            s_shard, t[:, cols].clone(), y, w, temp, group,
            t2_scaling=t2, loss_mask=mask, return_stats=True,
        )  # fmt: skip
        (loss * upstream).sum().backward()
        s64 = s.double().requires_grad_()
        ref = reference_kd_loss(s64, t, y, w, temp, t2_scaling=t2, loss_mask=mask)
        (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
        torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        assert s_shard.grad is not None
        torch.testing.assert_close(s_shard.grad.double(), grad64[:, cols], rtol=tol, atol=tol)
        for name in ("kd", "ce", "top1_agree"):
            got = getattr(stats, name).double()
            torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-5)
        n_checks += 1
    return n_checks


def _check_megatron_w0(tp: int, rank: int) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from salt_megatron.loss import kd_cross_entropy

    s, t, y, _ = _full_inputs(torch.float32)
    y[3] = 5  # megatron has no ignore index
    width = V // tp
    cols = slice(rank * width, (rank + 1) * width)
    mine_leaf = s[:, cols].clone().requires_grad_()
    meg_leaf = s[:, cols].clone().requires_grad_()
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    mine = kd_cross_entropy(mine_leaf, t[:, cols].clone(), y, 0.0, 2.0, group)
    theirs = vocab_parallel_cross_entropy(meg_leaf * 1.0, y)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    mine.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(mine_leaf.grad, meg_leaf.grad, rtol=1e-6, atol=1e-7)


def _check_collective_count(group, rank: int, tp: int) -> tuple[int, int]:
    from salt_megatron.loss import kd_cross_entropy

    s, t, y, mask = _full_inputs(torch.bfloat16)
    width = V // tp
    s_shard = s[:, rank * width : (rank + 1) * width].clone().requires_grad_()
    t_shard = t[:, rank * width : (rank + 1) * width].clone()
    with _CallCounter() as fwd:
        loss, _ = kd_cross_entropy(
            s_shard, t_shard, y, 0.5, 2.0, group, loss_mask=mask, return_stats=True
        )
    with _CallCounter() as bwd:
        loss.sum().backward()
    assert fwd.calls == ["all_reduce", "all_reduce"], fwd.calls
    assert bwd.calls == [], bwd.calls
    return len(fwd.calls), len(bwd.calls)


def _check_teacher_scratch(rank: int, tp: int, group) -> None:
    """teacher_scratch=True gives the same loss and gradient bit for bit, and uses the buffer."""
    from salt_megatron.loss import kd_cross_entropy

    s, t, y, mask = _full_inputs(torch.bfloat16)
    width = V // tp
    cols = slice(rank * width, (rank + 1) * width)
    grads = []
    for scratch in (False, True):
        leaf = s[:, cols].clone().requires_grad_()
        t_shard = t[:, cols].clone()
        loss = kd_cross_entropy(leaf, t_shard, y, 0.4, 2.0, group, loss_mask=mask,
                                teacher_scratch=scratch)  # fmt: skip
        loss.sum().backward()
        grads.append((loss, leaf.grad))
        assert torch.equal(t_shard, t[:, cols]) != scratch  # overwritten only when allowed
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _check_sparse(group, rank: int, tp: int) -> int:
    """The sparse loss on shards (the last one with padding columns) against its reference, the
    k = V case against the dense loss on the same shards, and two collectives in forward."""
    from salt_megatron.loss import (
        kd_cross_entropy,
        reference_sparse_kd_loss,
        sparse_kd_cross_entropy,
    )
    from salt_megatron.loss.sparse_kd import Residual
    from tests.unit.test_sparse_kd import sparse_targets

    v_true, width = V - 8, V // tp
    cols = slice(rank * width, (rank + 1) * width)
    n_checks = 0
    residuals: tuple[Residual, ...] = ("uniform", "drop")
    for dtype, temp, residual in itertools.product(
        (torch.float32, torch.bfloat16), (1.0, 2.0), residuals
    ):
        s, t, y, mask = _full_inputs(dtype)
        y = y.clamp(max=v_true - 1)
        ids, logp, resid = sparse_targets(t[:, :v_true].float(), temp, 16)
        upstream = torch.linspace(0.5, 1.5, y.numel())
        leaf = s[:, cols].clone().requires_grad_()
        with _CallCounter() as fwd:
            loss, stats = sparse_kd_cross_entropy(
                leaf, ids, logp, resid, y, 0.3, temp, group, residual=residual,
                vocab_size=v_true, t2_scaling=True, loss_mask=mask, return_stats=True,
            )  # fmt: skip
        with _CallCounter() as bwd:
            (loss * upstream).sum().backward()
        assert fwd.calls == ["all_reduce", "all_reduce"] and bwd.calls == [], (fwd.calls, bwd.calls)
        s64 = s.double().requires_grad_()
        ref = reference_sparse_kd_loss(
            s64, ids, logp, resid, y, 0.3, temp, residual=residual, vocab_size=v_true,
            t2_scaling=True, loss_mask=mask,
        )  # fmt: skip
        (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
        torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        assert leaf.grad is not None
        torch.testing.assert_close(leaf.grad.double(), grad64[:, cols], rtol=tol, atol=tol)
        for name in ("kd", "ce", "top1_agree"):
            got = getattr(stats, name).double()
            torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-5)
        n_checks += 1
    s, t, y, _ = _full_inputs(torch.float32)
    t[:, v_true:] = -1e30  # the teacher's padding, as the colocated teacher delivers it
    top = torch.log_softmax(t[:, :v_true] / 2.0, dim=-1).topk(v_true, dim=-1)
    grads = []
    for sparse in (True, False):
        leaf = s[:, cols].clone().requires_grad_()
        if sparse:
            loss = sparse_kd_cross_entropy(leaf, top.indices, top.values, torch.zeros(y.shape),
                                           y, 0.3, 2.0, group, vocab_size=v_true)  # fmt: skip
        else:
            loss = kd_cross_entropy(leaf, t[:, cols].clone(), y, 0.3, 2.0, group)
        loss.sum().backward()
        grads.append((loss, leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
    return n_checks + 1


def _check_teacher_targets_merge(group, rank: int, tp: int) -> None:
    """tools/save_teacher_targets.py's top-k / top-p merge across shards equals the one-shard
    result (ids exactly, ties included: rows 0-3 are 0/1 logits)."""
    from salt_megatron.distill.targets import sparse_targets

    _, t, _, _ = _full_inputs(torch.bfloat16)
    t[:, V - 8 :] = -1e30  # padding columns
    width = V // tp
    for top_p in (None, 0.8):
        got = sparse_targets(t[:, rank * width : (rank + 1) * width], 2.0, 16, top_p, group, V - 8)
        want = sparse_targets(t, 2.0, 16, top_p, None, V - 8)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6)


def _check_gate(group, rank: int, tp: int) -> int:
    """The token-level KD gate on shards: dense (both kinds, mixed) and sparse against the
    float64 references, with the same two collectives in forward and none in backward; the
    all-on gate equals the ungated loss, the all-off gate the w = 0 loss (bitwise)."""
    from salt_megatron.loss import (
        KDGate,
        kd_cross_entropy,
        reference_kd_loss,
        reference_sparse_kd_loss,
        sparse_kd_cross_entropy,
    )
    from salt_megatron.loss.reference import sparse_target_distribution
    from tests.unit.test_kd_gate import (
        check_against,
        gate_inputs,
        mixed_threshold,
        teacher_statistic,
    )
    from tests.unit.test_sparse_kd import sparse_targets

    width, v_true, temp = V // tp, V - 8, 2.0
    cols = slice(rank * width, (rank + 1) * width)
    s, t, y, mask = gate_inputs(torch.float32, v=V)
    upstream = torch.linspace(0.5, 1.5, y.numel())
    ids, logp, resid = sparse_targets(t[:, :v_true], temp, 16)
    y_sparse = y.clamp(max=v_true - 1)
    teachers = {
        "dense": torch.softmax(t.double() / temp, dim=-1),
        "sparse": sparse_target_distribution(ids, logp, resid, V, v_true, "uniform"),
    }

    def run(kind: str, gate, w: float = 0.4):  # type: ignore[no-untyped-def]
        leaf = s[:, cols].clone().requires_grad_()
        with _CallCounter() as fwd:
            if kind == "dense":
                loss, stats = kd_cross_entropy(
                    leaf, t[:, cols].clone(), y, w, temp, group, loss_mask=mask,
                    return_stats=True, gate=gate,
                )  # fmt: skip
            else:
                loss, stats = sparse_kd_cross_entropy(
                    leaf, ids, logp, resid, y_sparse, w, temp, group, vocab_size=v_true,
                    loss_mask=mask, return_stats=True, gate=gate,
                )  # fmt: skip
        with _CallCounter() as bwd:
            (loss * upstream).sum().backward()
        assert fwd.calls == ["all_reduce", "all_reduce"] and bwd.calls == [], (fwd.calls, bwd.calls)
        return loss, stats, leaf.grad

    n_checks = 0
    for which, gate_kind in itertools.product(
        teachers, ("teacher-confidence", "teacher-label-loss")
    ):
        labels = y if which == "dense" else y_sparse
        stat = teacher_statistic(teachers[which], labels, gate_kind)
        gate = KDGate(gate_kind, mixed_threshold(stat))  # type: ignore[arg-type]
        loss, stats, grad = run(which, gate)
        s64 = s.double().requires_grad_()
        if which == "dense":
            ref = reference_kd_loss(s64, t, y, 0.4, temp, loss_mask=mask, gate=gate)
        else:
            ref = reference_sparse_kd_loss(
                s64, ids, logp, resid, y_sparse, 0.4, temp, vocab_size=v_true, loss_mask=mask,
                gate=gate,
            )  # fmt: skip
        (grad64,) = torch.autograd.grad((ref["loss"] * upstream.double()).sum(), s64)
        check_against(loss, stats, grad, ref, grad64[:, cols], torch.float32)
        assert 0 < stats.kd_on.sum() < mask.sum()
        n_checks += 1
    for which in teachers:
        ungated, plain = run(which, None), run(which, None, w=0.0)
        all_on = run(which, KDGate("teacher-confidence", 1e-9))
        all_off = run(which, KDGate("teacher-confidence", 1.0))
        for got, want in ((all_on, ungated), (all_off, plain)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), which
        n_checks += 1
    return n_checks


def _check_unequal_shards_refused(group, rank: int, tp: int) -> None:
    from salt_megatron.loss import check_shard_widths

    check_shard_widths(V // tp, group, torch.device("cpu"))  # equal: no error
    with pytest.raises(ValueError, match="differ in width"):
        check_shard_widths(V // tp + (1 if rank == 0 else 0), group, torch.device("cpu"))


def _check_size_one_group(rank: int, world: int) -> None:
    from salt_megatron.loss import kd_cross_entropy

    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    s, t, y, mask = _full_inputs(torch.float32)
    with _CallCounter() as counter:
        a, sa = kd_cross_entropy(
            s, t, y, 0.3, 2.0, singles[rank], loss_mask=mask, return_stats=True
        )
    b, sb = kd_cross_entropy(s, t, y, 0.3, 2.0, None, loss_mask=mask, return_stats=True)
    assert counter.calls == []
    assert torch.equal(a, b) and torch.equal(sa.top1_agree, sb.top1_agree)


def tp_worker(tp: int) -> dict[str, object]:
    """Module-level entry point for run_distributed: every check on one TP group of size tp."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    n_checks = _check_against_reference(group, rank, tp)
    _check_megatron_w0(tp, rank)
    counts = _check_collective_count(group, rank, tp)
    _check_teacher_scratch(rank, tp, group)
    sparse_checks = _check_sparse(group, rank, tp)
    _check_teacher_targets_merge(group, rank, tp)
    gate_checks = _check_gate(group, rank, tp)
    _check_unequal_shards_refused(group, rank, tp)
    _check_size_one_group(rank, dist.get_world_size())
    return {"reference_checks": n_checks, "collectives_fwd_bwd": counts,
            "sparse_checks": sparse_checks, "gate_checks": gate_checks}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_kd_loss_tensor_parallel(tp: int) -> None:
    results = run_distributed(tp_worker, tp, tp)
    for res in results:
        assert res == {"reference_checks": 12, "collectives_fwd_bwd": (2, 0), "sparse_checks": 9,
                       "gate_checks": 6}  # fmt: skip
