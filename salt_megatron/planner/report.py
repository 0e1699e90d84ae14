"""The planner's report: one table per part of a :class:`~salt_megatron.planner.plan.Plan`."""

from __future__ import annotations

from salt_megatron.config.schema import SaltConfig
from salt_megatron.planner.memory import GIB
from salt_megatron.planner.plan import Plan


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [title, *(f"  {k.ljust(width)}  {v}" for k, v in rows), ""]


def format_plan(cfg: SaltConfig, p: Plan) -> str:
    """A readable report of a :class:`Plan`."""
    par, hw = cfg.parallel, p.hardware
    layout = (
        f"world {p.world_size} = TP {par.tensor_model_parallel_size} x PP "
        f"{par.pipeline_model_parallel_size} x DP {p.dp}; {p.n_micro} micro-batches of "
        f"{cfg.training.micro_batch_size} x {cfg.data.seq_length} tokens per step"
    )
    lines = [layout, ""]
    if p.moe:
        ep = par.expert_model_parallel_size
        edp = p.dp * par.tensor_model_parallel_size // (par.expert_tp * ep)
        lines[1:1] = [f"experts: expert TP {par.expert_tp} x EP {ep} x expert DP {edp} per stage"]
    params = [("student", f"{p.student_params / 1e9:8.3f} B")]
    if p.teacher_params:
        params.append(("teacher", f"{p.teacher_params / 1e9:8.3f} B"))
    params += [
        (f"student per rank, {k}", f"{v / 1e6:8.1f} M") for k, v in p.params_per_rank.items()
    ]
    lines += _table("Parameters", params)
    mem = [(k, _gib(v)) for k, v in p.memory.items()]
    mem.append((f"total (recompute: {p.recompute.label})", _gib(p.memory_total)))
    mem += [(f"  total with recompute {k}", _gib(v)) for k, v in p.memory_alternatives.items()]
    title = f"Memory per GPU (stage {p.busiest_stage}; {hw.gpu_memory_gib:g} GiB available)"
    lines += _table(title, mem)
    flops = [(k, f"{v / 1e9:8.2f} GFLOP/token") for k, v in p.flops.items()]
    if "teacher fwd" in p.flops:
        flops.append(("KD overhead, ideal", f"x{p.overhead_ideal:.3f}"))
        if par.pipeline_model_parallel_size > 1:
            flops.append(("KD overhead, slowest pipeline stage", f"x{p.overhead_pipeline:.3f}"))
            flops.append(("  (whole teacher on the last stage", f"x{p.overhead_last_stage:.3f})"))
    lines += _table("FLOPs", flops)
    if p.moe:
        lines += _table("Mixture of experts (balanced routing)", _moe_rows(p.moe))
    times = [(k, f"{v:8.3f} s") for k, v in p.step_seconds.items()]
    times.append(
        ("whole run", f"{p.total_hours:8.1f} h ({p.total_hours * p.world_size:,.0f} GPU-h)")
    )
    lines += _table(f"Time at MFU {hw.mfu:g} of {hw.gpu_tflops:g} TFLOP/s per GPU", times)
    lines += [f"WARNING: {w}" for w in p.warnings] or ["fits"]
    return "\n".join(lines)


def _moe_rows(moe: dict[str, float]) -> list[tuple[str, str]]:
    rows = []
    for key, value in moe.items():
        if key == "active parameters per token":
            rows.append((key, f"{value / 1e9:8.3f} B"))
        elif key == "active fraction":
            rows.append((key, f"{value:8.3f}"))
        elif key.startswith("dispatcher traffic"):
            rows.append((key, _gib(value)))
        else:
            rows.append((key, f"{value:8.0f}"))
    return rows
