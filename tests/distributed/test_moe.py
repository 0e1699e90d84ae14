"""MoE students with expert parallelism (EP) against the single-process run, with SALT's KD.

Three launches. World 1 trains and saves a dense and an MoE teacher (one step each), then runs
the references: the MoE student (4 experts, top-2, a dense layer among three MoE layers, a
shared expert, load-balancing loss 0.1) for 3 steps, 2 of them KD, from each teacher; and
the load-balancing checks below. World 2 and world 4 run the same student, weights and data at

* EP 2 with the all-to-all and the all-gather dispatcher (dense teacher), EP 2 from the MoE
  teacher, EP 2 with the distributed optimizer (world 2),
* TP 2 x EP 2 with sequence parallelism, all-to-all from the MoE teacher at teacher TP 2,
  all-gather from the dense teacher at teacher TP 1; PP 2 x EP 2, all-to-all, from the MoE
  teacher (its forwards spread over the stages) (world 4),

and every step's loss, LM loss, KD loss and grad norm must equal the reference within 1e-5
(no capacity factor: EP does not change the math). World 2 also saves at EP 2 inside the KD
phase and resumes at EP 1 (the plain and the distributed optimizer, fully reshardable), checks
that a ``dp_reshardable`` state refuses the EP change, and counts each rank's parameters
against the planner at EP 2.

The load-balancing checks (world 1) capture the last MoE layer's router input and weight:

* the loss's gradient (router weight gradient with ``--moe-aux-loss-coeff 0.1`` minus without)
  is the same at KD weight 0.3 and 0.9 and equals a float64 autograd of
  ``sum_m coeff E sum_i f_i P_i x T_m / N`` (micro-batches ``m`` of ``T_m`` tokens, ``N``
  loss tokens in the step: megatron's per-token scaling);
* the logged metrics equal the same float64 routing: the layer's load balancing loss, busiest
  expert over mean, and (capacity factor 0.5) the dropped fraction ``sum_i max(0, c_i - cap)``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.test_parallel_equivalence import SEQ, VOCAB
from tests.distributed.test_teacher_pipeline import (
    FIELDS,
    _checkpointer,
    _finish,
    _record,
    _trainer,
)

pytestmark = pytest.mark.distributed

COMMON = [
    "--mock-data", "--vocab-size", str(VOCAB), "--seq-length", str(SEQ),
    "--make-vocab-size-divisible-by", "8", "--micro-batch-size", "2", "--global-batch-size",
    "8", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
]  # fmt: skip
DENSE_TEACHER = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--init-method-std", "0.3", "--train-iters", "1"]  # fmt: skip
MOE_TEACHER = [*DENSE_TEACHER, "--num-experts", "4", "--moe-ffn-hidden-size", "32"]
EXPERTS = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
           "--moe-layer-freq", "1", "1", "0", "1", "--moe-shared-expert-intermediate-size", "32",
           "--moe-aux-loss-coeff", "0.1"]  # fmt: skip
STUDENT = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
           *EXPERTS, "--train-iters", "3", "--kd-steps", "2", "--kd-weight", "0.6",
           "--kd-schedule", "linear", "--kd-temperature", "2"]  # fmt: skip
EP2 = ["--expert-model-parallel-size", "2"]
A2A, AG = ["--moe-token-dispatcher-type", "alltoall"], ["--moe-token-dispatcher-type", "allgather"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
DISTOPT = ["--use-distributed-optimizer"]
WORLD2 = {  # name -> (teacher, flags)
    "EP2-alltoall": ("dense", [*EP2, *A2A]),
    "EP2-allgather": ("dense", [*EP2, *AG]),
    "EP2-alltoall-moe-teacher": ("moe", [*EP2, *A2A]),
    "EP2-distopt": ("dense", [*EP2, *A2A, *DISTOPT]),
}
WORLD4 = {
    "TP2xEP2-alltoall-moe-teacher-TP2": (
        "moe", [*TP2, *EP2, *A2A, "--teacher-tensor-model-parallel-size", "2"]
    ),
    "TP2xEP2-allgather": ("dense", [*TP2, *EP2, *AG]),
    "PP2xEP2-alltoall-moe-teacher": ("moe", ["--pipeline-model-parallel-size", "2", *EP2, *A2A]),
}  # fmt: skip
LAST_MOE_LAYER = 3  # 0-based index of the last MoE layer (pattern 1 1 0 1)


def _student(tmp: str, teacher: str, extra: list[str]) -> list[str]:
    return [*COMMON, *STUDENT, "--kd-teacher-load", os.path.join(tmp, teacher), *extra]


def _train(args: list[str]) -> dict[str, Any]:
    trainer = _trainer(args)
    history = trainer.train()
    out = {"steps": _record(history), "kd": [r.kd_phase for r in history]}
    _finish(trainer)
    return out


# ---- world 1: teachers, references, the load-balancing loss --------------------------------------
class _RouterInputs:
    """Captures the input and weight of one router at each training forward."""

    def __init__(self, trainer: Any, layer: int) -> None:
        from salt_megatron.models.moe import moe_router_modules

        (self.router,) = [r for n, r in moe_router_modules(trainer.model[0].module) if n == layer]
        self.seen: list[tuple[Any, Any]] = []
        self.router.register_forward_pre_hook(self._capture)

    def _capture(self, module: Any, inputs: Any) -> None:
        if module.training:
            hidden = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).clone()
            self.seen.append((hidden, module.weight.detach().clone()))


def _routing(x: Any, w: Any, topk: int) -> tuple[Any, Any]:
    """float64 softmax scores and the top-k routing map, chosen on float32 logits as megatron."""
    import torch

    chosen = torch.topk(torch.mm(x, w.t()), topk, dim=1).indices
    routing_map = torch.zeros(x.shape[0], w.shape[0], dtype=torch.bool).scatter(1, chosen, True)
    return torch.softmax(torch.mm(x.double(), w.double().t()), dim=-1), routing_map


def _aux_reference(seen: list[tuple[Any, Any]], coeff: float, topk: int, tokens: int) -> Any:
    """float64 gradient of the step's load-balancing loss w.r.t. the router weight, and the
    per-micro-batch losses ``E sum_i f_i P_i``."""
    import torch

    w = seen[0][1].double().requires_grad_(True)
    total, losses = torch.zeros((), dtype=torch.float64), []
    for x, _ in seen:
        _, routing_map = _routing(x, seen[0][1], topk)
        scores = torch.softmax(torch.mm(x.double(), w.t()), dim=-1)
        t, e = x.shape[0], w.shape[0]
        f = routing_map.sum(0).double() / (t * topk)
        loss = e * (f * scores.mean(0)).sum()
        losses.append(float(loss))
        total = total + coeff * loss * t / tokens
    total.backward()
    return w.grad, losses


def _router_gradient(tmp: str, kd_weight: float, coeff: float) -> dict[str, Any]:
    """One KD step (hard-switch schedule, no clipping) with the given weight and coefficient."""
    args = _student(
        tmp,
        "dense",
        [
            "--kd-weight",
            str(kd_weight),
            "--kd-schedule",
            "step",
            "--moe-aux-loss-coeff",
            str(coeff),
            "--clip-grad",
            "0",
        ],
    )
    trainer = _trainer(args)  # fmt: skip
    probe = _RouterInputs(trainer, LAST_MOE_LAYER + 1)
    result = trainer.train_step()
    out = {"grad": probe.router.weight.main_grad.clone(), "seen": probe.seen,
           "tokens": result.tokens, "metrics": trainer.moe.collect()}  # fmt: skip
    _finish(trainer)
    return out


def _dropping(tmp: str) -> dict[str, Any]:
    """One plain step with capacity factor 0.5, logged (``--metrics-file``, the writer that also
    feeds TensorBoard): the logged records and the router's inputs."""
    import json

    path = os.path.join(tmp, "metrics.jsonl")
    flags = ["--kd-steps", "0", "--moe-expert-capacity-factor", "0.5", "--train-iters", "1",
             "--log-interval", "1", "--metrics-file", path]  # fmt: skip
    trainer = _trainer([*COMMON, *STUDENT, *flags])
    probe = _RouterInputs(trainer, LAST_MOE_LAYER + 1)
    trainer.train()
    _finish(trainer)
    with open(path) as f:
        records = {r["group"]: r for r in map(json.loads, f)}
    return {"seen": probe.seen, "metrics": records["moe"], "train": records["train"]}


def _world1(tmp: str) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    for name, flags in (("dense", DENSE_TEACHER), ("moe", MOE_TEACHER)):
        teacher = _trainer([*COMMON, *flags, "--save", os.path.join(tmp, name)])
        teacher.train()
        _checkpointer(teacher).save()
        _finish(teacher)
    refs = {name: _train(_student(tmp, name, A2A)) for name in ("dense", "moe")}
    grads = {(w, c): _router_gradient(tmp, w, c) for w in (0.3, 0.9) for c in (0.0, 0.1)}
    return {"refs": refs, "grads": grads, "dropping": _dropping(tmp)}


# ---- world 2 and 4 ---------------------------------------------------------------------------
def _resume(tmp: str, save: list[str], load: list[str], root: str) -> list[dict[str, float]]:
    """Save after step 1 (KD phase) at the ``save`` layout; resume at ``load``: steps 2 and 3."""
    first = _trainer(_student(tmp, "dense", [*save, "--save", root]))
    first.train_step()
    _checkpointer(first).save()
    _finish(first)
    second = _trainer(_student(tmp, "dense", [*load, "--load", root]))
    assert _checkpointer(second).resume() == 1
    history = [second.train_step(), second.train_step()]
    _finish(second)
    return _record(history)


def _refused(tmp: str, root: str) -> str:
    """A dp_reshardable distributed-optimizer checkpoint at EP 2, loaded at EP 1: the error."""
    from salt_megatron.checkpoint.layout import CheckpointError

    first = _trainer(_student(tmp, "dense", [*EP2, *DISTOPT, "--save", root]))
    _checkpointer(first).save()
    _finish(first)
    second = _trainer(_student(tmp, "dense", [*DISTOPT, "--load", root]))
    try:
        _checkpointer(second).resume()
    except CheckpointError as exc:
        return str(exc)
    finally:
        _finish(second)
    return "loaded"


def _planner_counts(tmp: str) -> tuple[int, int]:
    """This rank's parameters at EP 2, built and as the planner counts them."""
    from salt_megatron import planner
    from salt_megatron.models.student import count_parameters

    trainer = _trainer(_student(tmp, "dense", [*EP2, "--kd-steps", "0"]))
    built = count_parameters(trainer.model)
    cfg = trainer.cfg
    counted = planner.stage_params(cfg.model, trainer.padded_vocab, tp=1, pp=1, ep=2)
    _finish(trainer)
    return built, counted


def _world2(tmp: str) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    runs = {name: _train(_student(tmp, t, flags)) for name, (t, flags) in WORLD2.items()}
    full = [*DISTOPT, "--ckpt-fully-reshardable"]
    return {
        "runs": runs,
        "resumed": _resume(tmp, [*EP2, *A2A], A2A, os.path.join(tmp, "ck_plain")),
        "resumed_distopt": _resume(tmp, [*EP2, *full], full, os.path.join(tmp, "ck_distopt")),
        "refused": _refused(tmp, os.path.join(tmp, "ck_refused")),
        "counts": _planner_counts(tmp),
    }


def _world4(tmp: str) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    return {name: _train(_student(tmp, t, flags)) for name, (t, flags) in WORLD4.items()}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def world1(tmp: str) -> dict[str, Any]:
    (out,) = run_distributed(_world1, 1, tmp)
    return out


def _close(got: dict[str, float], want: dict[str, float], where: Any) -> None:
    for key in FIELDS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (where, key)


def _compare(run: dict[str, Any], ref: dict[str, Any], where: Any) -> None:
    assert run["kd"] == [True, True, False], where
    for step, (got, want) in enumerate(zip(run["steps"], ref["steps"], strict=True), 1):
        _close(got, want, (where, step))


def test_world2_expert_parallel_matches_ep1(world1: dict[str, Any], tmp: str) -> None:
    refs = world1["refs"]
    assert refs["dense"]["steps"][0]["kd_loss"] > 0 and refs["dense"]["steps"][2]["kd_loss"] == 0
    assert refs["dense"]["steps"][0]["kd_loss"] != refs["moe"]["steps"][0]["kd_loss"]
    ranks = run_distributed(_world2, 2, tmp)
    for rank, out in enumerate(ranks):
        for name, run in out["runs"].items():
            _compare(run, refs[WORLD2[name][0]], (name, rank))
        for key in ("resumed", "resumed_distopt"):  # EP 2 -> EP 1 inside the KD phase
            for step, got in enumerate(out[key], 2):
                _close(got, refs["dense"]["steps"][step - 1], (key, rank, step))
        assert "cannot change layout (EP 2 -> 1)" in out["refused"], out["refused"]
        built, counted = out["counts"]
        assert built == counted, (rank, built, counted)


def test_world4_tp2_x_ep2_matches_ep1(world1: dict[str, Any], tmp: str) -> None:
    refs = world1["refs"]
    for rank, out in enumerate(run_distributed(_world4, 4, tmp)):
        for name, run in out.items():
            _compare(run, refs[WORLD4[name][0]], (name, rank))


def test_load_balancing_gradient_is_not_scaled_by_kd(world1: dict[str, Any]) -> None:
    import torch

    grads = world1["grads"]
    aux = {w: grads[w, 0.1]["grad"] - grads[w, 0.0]["grad"] for w in (0.3, 0.9)}
    run = grads[0.3, 0.1]
    ref, _ = _aux_reference(run["seen"], 0.1, 2, run["tokens"])
    scale = ref.abs().max().item()
    assert scale > 1e-3  # the loss reaches the router
    for w in (0.3, 0.9):
        assert torch.allclose(aux[w].double(), ref, atol=1e-6 * scale + 1e-9, rtol=1e-4), w
    # the main-loss part does change with the KD weight
    assert not torch.allclose(grads[0.3, 0.0]["grad"], grads[0.9, 0.0]["grad"])


def test_routing_metrics_match_float64(world1: dict[str, Any]) -> None:
    import math

    import torch

    run = world1["grads"][0.3, 0.1]
    _, losses = _aux_reference(run["seen"], 0.1, 2, run["tokens"])
    counts = sum(_routing(x, w, 2)[1].sum(0).double() for x, w in run["seen"])
    metrics, layer = run["metrics"], f"layer{LAST_MOE_LAYER}/"
    assert metrics[layer + "load_balancing_loss"] == pytest.approx(sum(losses) / len(losses))
    assert metrics[layer + "load_max_over_mean"] == pytest.approx(
        float(counts.max() / counts.mean())
    )
    assert metrics[layer + "dropped"] == 0.0 and "layer2/dropped" not in metrics  # layer 2: dense
    dropped = world1["dropping"]
    kept = routed = 0
    for x, w in dropped["seen"]:
        per_expert = _routing(x, w, 2)[1].sum(0)
        cap = math.ceil(x.shape[0] * 2 / per_expert.numel() * 0.5)  # an expert's capacity
        kept += int(torch.clamp(per_expert, max=cap).sum())
        routed += x.shape[0] * 2
    got = dropped["metrics"][layer + "dropped"]
    assert got == pytest.approx(1 - kept / routed) and got > 0
    mean = sum(dropped["metrics"][f"layer{i}/dropped"] for i in (0, 1, 3)) / 3
    assert math.isclose(dropped["metrics"]["dropped"], mean)
    assert dropped["train"]["moe_dropped"] == dropped["metrics"]["dropped"]  # the console's
