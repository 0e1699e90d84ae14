"""Optimizer state for dist-checkpointing; fixes for megatron's DistributedOptimizer + torch Adam.

Without apex or Transformer Engine (every CPU run) megatron-core 0.16.1 falls back to
``torch.optim.Adam(W)``, whose per-parameter ``step`` tensor the DistributedOptimizer handles in
three broken ways (see docs/notes "DistributedOptimizer checkpoint load with torch's Adam"), and
its ``dp_reshardable`` load has two more bugs:

1. ``state_dict()`` asserts ``len(steps) == 1`` over the per-param states: it fails on a fresh
   optimizer, which has no state yet (every load, and a save before the first update).
   Fix: :func:`seed_state` creates Adam's empty state (``step`` 0, zero moments: exactly what
   torch's first ``step()`` would create) before the sharded state dict is built.
2. ``load_parameter_state_from_fully_reshardable`` skips ``step`` in the loaded tensors, but
   ``_set_main_param_and_optimizer_states`` copies every key of the live state, ``step``
   included: ``KeyError: 'step'``. Fix: :func:`load` hides ``step`` from that copy.
3. ``load_state_dict`` gives every parameter *the same* ``step`` tensor, which torch's Adam then
   increments once per parameter (2 -> 54 after one step): silently wrong bias correction.
   Fix: :func:`untie_steps` gives each parameter its own copy after a load.
4. ``load_parameter_state_from_dp_reshardable`` (unlike the ``fully_reshardable`` path) runs
   with autograd on and copies in place into the main parameters, which without a separate
   float32 copy (float32 training) *are* the model's leaf parameters: "a view of a leaf Variable
   that requires grad is being used in an in-place operation". Fix: :func:`load` runs under
   ``torch.no_grad()``.
5. The ``dp_reshardable`` form does not save ``step`` (it restores it from the param groups, as
   the other forms do) but keeps the *live* step tensor of the state dict built for the load as
   a non-persistent entry, and ``_set_main_param_and_optimizer_states`` then copies that stale
   value (0 on a fresh optimizer) over the restored step: silently wrong bias correction after
   every resume. Fix: the wrapped copy of bug 2 never copies ``step``.

Separately, :func:`zero_padding` keeps uninitialised memory out of ``dp_reshardable`` files
(megatron fills the gaps between parameters in a bucket with ``torch.empty``), so that equal
states make equal checkpoints.

The non-distributed optimizers (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params``) store a
common step and restore per-parameter copies themselves; :func:`seed_state` and
:func:`untie_steps` are harmless for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

DP_RESHARDABLE = "dp_reshardable"
"""Every rank writes its own buckets of the distributed optimizer's state, no gather; loads only at
the same TP, PP and virtual PP (and the same gradient-bucket layout, which can follow DP)."""
FULLY_RESHARDABLE = "fully_reshardable"
"""The state gathered per data-parallel group into per-parameter tensors: loads at any layout."""


def _leaves(optimizer: MegatronOptimizer) -> Iterator[MegatronOptimizer]:
    yield from getattr(optimizer, "chained_optimizers", [optimizer])


def _torch_optimizers(optimizer: MegatronOptimizer) -> Iterator[torch.optim.Optimizer]:
    for leaf in _leaves(optimizer):
        inner = getattr(leaf, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield inner


def seed_state(optimizer: MegatronOptimizer) -> None:
    """Give every parameter without state torch Adam's initial state (bug 1)."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    state = inner.state[p]
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def untie_steps(optimizer: MegatronOptimizer) -> None:
    """Give each parameter its own ``step`` tensor (bug 3)."""
    for inner in _torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.detach().clone()
                seen.add(id(state["step"]))


def sharded_state_dict(
    optimizer: MegatronOptimizer,
    model_sharded: dict[str, Any],
    is_loading: bool,
    sharding_type: str = DP_RESHARDABLE,
) -> Any:
    """The optimizer's sharded state; the distributed optimizer's in ``sharding_type`` form."""
    seed_state(optimizer)
    metadata = {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}
    state = optimizer.sharded_state_dict(  # type: ignore[call-arg]
        model_sharded, is_loading=is_loading, metadata=metadata
    )
    if is_loading:
        untie_steps(optimizer)  # DistributedOptimizer just reloaded its own state: re-tied
    else:
        zero_padding(state)
    return state


def zero_padding(state: Any) -> None:
    """Zero the padding entries of a ``dp_reshardable`` state (megatron allocates them empty)."""
    if isinstance(state, dict):
        padding = state.get("padding")
        if isinstance(padding, LocalNonpersistentObject) and padding.unwrap() is True:
            for value in state.values():
                if isinstance(value, ShardedTensor):
                    value.data.zero_()
        for value in state.values():
            zero_padding(value)
    elif isinstance(state, list | tuple):
        for value in state:
            zero_padding(value)


def _hide_step_on_copy(dist_opt: DistributedOptimizer) -> None:
    """Wrap ``_set_main_param_and_optimizer_states`` so that it leaves ``step`` alone (2 and 5)."""
    original = dist_opt._set_main_param_and_optimizer_states

    def set_without_step(model_param: torch.nn.Parameter, tensors: dict[str, Any]) -> None:
        group_index, group_order = dist_opt.model_param_group_index_map[model_param]
        main_param = dist_opt.optimizer.param_groups[group_index]["params"][group_order]
        state = dist_opt.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            original(model_param, {k: v for k, v in tensors.items() if k != "step"})
        finally:
            if step is not None:
                state["step"] = step  # still shared: untie_steps() separates them

    dist_opt._set_main_param_and_optimizer_states = set_without_step  # type: ignore[method-assign]


def load(optimizer: MegatronOptimizer, state: Any) -> None:
    """Load a state loaded by dist-checkpointing into ``optimizer`` (every fix above applied)."""
    for leaf in _leaves(optimizer):
        if isinstance(leaf, DistributedOptimizer) and not hasattr(leaf, "_salt_step_fix"):
            _hide_step_on_copy(leaf)
            leaf._salt_step_fix = True  # type: ignore[attr-defined]
    with torch.no_grad():  # bug 4
        optimizer.load_state_dict(state)
    untie_steps(optimizer)


def adam_steps(optimizer: MegatronOptimizer) -> list[float]:
    """Every parameter's Adam ``step`` (for tests and sanity checks)."""
    return [
        float(state["step"])
        for inner in _torch_optimizers(optimizer)
        for state in inner.state.values()
        if "step" in state
    ]
