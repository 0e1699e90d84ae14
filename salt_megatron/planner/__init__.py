"""Capacity planner: per-GPU memory and step time of a SALT run, from its config alone.

Everything here is arithmetic on shapes (no GPU, no process group), so ``tools/plan.py`` runs
anywhere. One module per job: :mod:`.params` (parameters per rank, dense and MoE),
:mod:`.memory` (bytes on a rank, by component), :mod:`.moe` (expert counts, active parameters,
MoE activations and the dispatcher's traffic), :mod:`.plan` (the plan: FLOPs, KD overhead, step
time, warnings) and :mod:`.report` (its text).
"""

from salt_megatron.planner.memory import (
    GIB,
    KD_CHUNK_TEMPORARIES,
    KD_GPU_CHUNK_ELEMS,
    RECOMPUTE_ALTERNATIVES,
    Recompute,
    activation_bytes_per_layer,
    activation_parts_per_layer,
    in_flight_factor,
    kd_buffer_bytes,
    recompute_bytes_per_layer,
    stage_activation_bytes,
    stage_memory,
    state_bytes_per_param,
    teacher_fp8,
    teacher_memory,
)
from salt_megatron.planner.moe import dispatch_bytes_per_layer, moe_summary
from salt_megatron.planner.params import (
    active_params,
    layer_params,
    stage_expert_params,
    stage_params,
    total_params,
)
from salt_megatron.planner.plan import Hardware, Plan, kd_step_ratio, plan
from salt_megatron.planner.report import format_plan

__all__ = [
    "GIB", "KD_CHUNK_TEMPORARIES", "KD_GPU_CHUNK_ELEMS", "RECOMPUTE_ALTERNATIVES", "Hardware",
    "Plan", "Recompute", "activation_bytes_per_layer", "activation_parts_per_layer",
    "active_params", "dispatch_bytes_per_layer", "format_plan", "in_flight_factor",
    "kd_buffer_bytes", "kd_step_ratio", "layer_params", "moe_summary", "plan",
    "recompute_bytes_per_layer", "stage_activation_bytes", "stage_expert_params", "stage_memory",
    "stage_params", "state_bytes_per_param", "teacher_fp8", "teacher_memory", "total_params",
]  # fmt: skip
