"""The planner's arithmetic against hand-computed values, and tools/plan.py on the paper config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from salt_megatron import planner
from salt_megatron.config import parse_config
from salt_megatron.config.schema import ModelConfig
from salt_megatron.models import flops as model_flops

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "examples" / "configs" / "salt_pile_1p5b_2p8b.yaml"
MULTI = ROOT / "examples" / "configs" / "multi_node.yaml"

#: GELU MLP of width 32, LayerNorm, biases, untied, learned positions (h = 8, 2 heads).
GELU = ModelConfig(
    num_layers=2,
    hidden_size=8,
    num_attention_heads=2,
    ffn_hidden_size=16,
    swiglu=False,
    normalization="LayerNorm",
    add_bias_linear=True,
    position_embedding_type="learned_absolute",
    max_position_embeddings=32,
)
#: SwiGLU (width 16), RMSNorm, no biases, GQA (4 heads, 2 groups), tied embeddings, rope.
SWIGLU = ModelConfig(
    num_layers=3,
    hidden_size=8,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=16,
    untie_embeddings_and_output_weights=False,
)


def test_layer_params_by_hand() -> None:
    # QKV 8x24 + 24, proj 64 + 8, fc1 8x16 + 16, fc2 16x8 + 8, two LayerNorms 2 x 16.
    assert planner.layer_params(GELU) == 192 + 24 + 64 + 8 + 128 + 16 + 128 + 8 + 32
    # TP 2 shards QKV/fc1 weights and biases and proj/fc2 weights; their biases and norms stay.
    assert planner.layer_params(GELU, tp=2) == (192 + 24 + 128 + 16) // 2 + (64 + 128) // 2 + 48
    # QKV 8 x (8 + 2 x 4), proj 64, fc1 8 x 32, fc2 16 x 8, two RMSNorms 2 x 8.
    assert planner.layer_params(SWIGLU) == 128 + 64 + 256 + 128 + 16


def test_stage_params_by_hand() -> None:
    # 2 layers + word embeddings 16x8 + positions 32x8 + final norm 16 + output 16x8.
    assert planner.stage_params(GELU, 16) == 2 * 600 + 128 + 256 + 16 + 128
    assert planner.total_params(SWIGLU, 16) == 3 * 592 + 128 + 8  # tied: no output layer
    # PP 3, tied: stage 0 has the embeddings, the last stage the norm and a copy of them.
    assert planner.stage_params(SWIGLU, 16, pp=3, stage=0) == 592 + 128
    assert planner.stage_params(SWIGLU, 16, pp=3, stage=1) == 592
    assert planner.stage_params(SWIGLU, 16, pp=3, stage=2) == 592 + 8 + 128
    # TP 2: QKV + fc1 and proj + fc2 halve, the norms (16) stay; norm 8 + half the embeddings.
    layer_tp2 = (128 + 256) // 2 + (64 + 128) // 2 + 16
    assert planner.stage_params(SWIGLU, 16, tp=2, pp=3, stage=2) == layer_tp2 + 8 + 64


def test_state_bytes_per_param() -> None:
    assert planner.state_bytes_per_param(bf16=True, distributed_optimizer=False, dp=8) == 18
    assert planner.state_bytes_per_param(bf16=True, distributed_optimizer=True, dp=8) == 6 + 1.5
    assert planner.state_bytes_per_param(bf16=False, distributed_optimizer=False, dp=4) == 16
    assert planner.state_bytes_per_param(bf16=False, distributed_optimizer=True, dp=4) == 10


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_activations_match_korthikanti(tp: int) -> None:
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, swiglu=False)
    s, b, h, a = 128, 2, 64, 4
    sbh = s * b * h
    no_sp = planner.activation_bytes_per_layer(model, s, b, tp=tp, sp=False, flash=False)
    assert no_sp == pytest.approx(sbh * (10 + 24 / tp + 5 * a * s / (h * tp)))
    with_sp = planner.activation_bytes_per_layer(model, s, b, tp=tp, sp=True, flash=False)
    assert with_sp == pytest.approx(sbh * (34 + 5 * a * s / h) / tp)
    flash = planner.activation_bytes_per_layer(model, s, b, tp=tp, sp=True, flash=True)
    assert flash == pytest.approx(sbh * 34 / tp)
    assert planner.recompute_bytes_per_layer(s, b, h, tp=tp, sp=True) == 2 * sbh / tp


def test_in_flight_micro_batches() -> None:
    assert planner.in_flight_factor(1, None, 8) == 1
    assert planner.in_flight_factor(4, None, 8, stage=0) == 4
    assert planner.in_flight_factor(4, None, 8, stage=3) == 1
    assert planner.in_flight_factor(4, None, 2) == 2
    assert planner.in_flight_factor(4, 2, 8) == pytest.approx(4 * (1 + 3 / 8))


def test_paper_plan_overhead_and_fit() -> None:
    cfg = parse_config(["--config", str(PAPER)])
    result = planner.plan(cfg, 64, 50000, planner.Hardware())
    s_fwd_bwd = model_flops.train_flops_per_token(cfg.model, 2048, 50176)  # padded to 128 x TP 2
    t_fwd = model_flops.forward_flops_per_token(cfg.teacher, 2048, 50048)  # padded to 128 x TP 1
    assert result.overhead_ideal == pytest.approx(1 + t_fwd / s_fwd_bwd)
    assert 1.1 < result.overhead_ideal < 1.25
    assert 2.7e9 < result.student_params < 2.9e9 and 1.35e9 < result.teacher_params < 1.5e9
    assert result.dp == 32 and result.n_micro == 4 and not result.warnings
    plain = 512 * 2048 * s_fwd_bwd / (64 * 989e12 * 0.4)
    assert result.step_seconds["plain step"] == pytest.approx(plain)
    hours = (36000 * plain * result.overhead_ideal + 172000 * plain) / 3600
    assert result.total_hours == pytest.approx(hours)
    # The body is built with the student's padded vocabulary and without its output layer.
    body = planner.total_params(cfg.teacher, 50176) - 50176 * cfg.teacher.hidden_size
    assert result.memory["teacher body weights"] == pytest.approx(body * 2)
    assert result.memory["teacher head (vocabulary slice)"] == 50176 // 2 * 2048 * 2


def test_fp8_teacher_weights_take_one_byte() -> None:
    cfg = parse_config(["--config", str(PAPER), "--fp8-format", "hybrid"])
    result = planner.plan(cfg, 64, 50000, planner.Hardware())
    body = planner.total_params(cfg.teacher, 50176) - 50176 * cfg.teacher.hidden_size
    assert result.memory["teacher body weights"] == pytest.approx(body)


def test_warnings_when_it_does_not_fit() -> None:
    cfg = parse_config(["--config", str(PAPER)])
    tight = planner.plan(cfg, 64, 50000, planner.Hardware(gpu_memory_gib=20))
    assert any(
        w.startswith("does not fit with recompute none") and "--recompute-granularity" in w
        for w in tight.warnings
    ), tight.warnings
    small = planner.plan(cfg, 64, 50000, planner.Hardware(gpu_memory_gib=8))
    assert any("even with full recomputation" in w for w in small.warnings)


def test_kd_step_ratio_by_hand() -> None:
    """Per-stage FLOPs: layers ``X`` and head ``H`` forward per token, the student 3x that."""
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4)
    head = 2.0 * 64 * 128
    layers = model_flops.forward_flops_per_token(model, 16, 128) - head
    # A student-sized teacher split evenly: every stage does 3 X/p (+ 3 H) and X/p (+ H) more.
    for pp, n_micro in ((1, 3), (2, 4), (4, 8)):
        ratio = planner.kd_step_ratio(model, model, 16, 128, pp, n_micro)
        assert ratio == pytest.approx(4 / 3), pp
    # 3 micro-batches on 2 stages: blocks of 2 and 1.
    plain = 1.5 * layers + 3 * head
    kd = max(1.5 * layers + 2 / 3 * layers, plain + layers / 3 + head)
    assert planner.kd_step_ratio(model, model, 16, 128, 2, 3) == pytest.approx(kd / plain)
    # The whole teacher on the last of 4 stages (the placement before the teacher pass).
    last = planner.kd_step_ratio(model, model, 16, 128, 4, 8, balanced=False)
    plain = 0.75 * layers + 3 * head
    assert last == pytest.approx((plain + layers + head) / plain)


def test_pipeline_balances_the_teacher() -> None:
    cfg = parse_config(["--config", str(MULTI)])
    result = planner.plan(cfg, 32, 50000, planner.Hardware())
    want = planner.kd_step_ratio(cfg.model, cfg.teacher, 2048, 50176, 2, result.n_micro)
    assert result.overhead_pipeline == pytest.approx(want)
    assert result.overhead_pipeline < result.overhead_ideal * 1.01 and not result.warnings
    assert "KD step (slowest pipeline stage)" in result.step_seconds
    first = planner.stage_memory(cfg, 50000, result.dp, result.n_micro, 0)
    last = planner.stage_memory(cfg, 50000, result.dp, result.n_micro, 1)
    assert first["teacher body weights"] == last["teacher body weights"] > 0
    hidden = 2 * 2048 * cfg.teacher.hidden_size * 2  # micro-batch x seq x h, bf16
    assert last["teacher hidden states of the step"] == result.n_micro * hidden
    assert first["teacher hidden states of the step"] == result.n_micro // 2 * hidden
    assert "teacher head (vocabulary slice)" not in first


def _plan_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", ROOT / "tools" / "plan.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_tool_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _plan_tool()
    assert tool.main(["--config", str(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "world 64 = TP 2 x PP 1 x DP 32" in out and "KD overhead, ideal" in out
    assert tool.main(["--config", str(PAPER), "--gpu-memory-gib", "8"]) == 1
    assert "WARNING: does not fit" in capsys.readouterr().out
    assert tool.main(["--config", str(PAPER), "--world-size", "63"]) == 2


def test_recompute_choices_by_hand() -> None:
    """4 layers in 2 virtual chunks on a stage, 3 micro-batches in flight (GELU MLP of 4h)."""
    model = ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, swiglu=False)
    s, b, h, a = 128, 2, 64, 4
    sbh, scores, mlp = s * b * h, 5 * a * s * s * b, 2 * s * b * 4 * h * 2
    parts = planner.activation_parts_per_layer(model, s, b, tp=1, sp=False, flash=False)
    full = sbh * (34 + 5 * a * s / h)
    assert sum(parts.values()) == pytest.approx(full)
    assert (parts["core_attn"], parts["mlp"]) == (scores, mlp)
    stored, rc = 2 * sbh, planner.Recompute

    def on_stage(choice: planner.Recompute) -> float:
        return planner.stage_activation_bytes(parts, stored, 4, 2, 3.0, choice)

    assert on_stage(rc()) == pytest.approx(3 * 4 * full)
    assert on_stage(rc("full", "uniform", 2)) == pytest.approx(3 * 2 * stored + 2 * full)
    assert on_stage(rc("full", "block", 1)) == pytest.approx(3 * 2 * (stored + full) + full)
    assert on_stage(rc("selective")) == pytest.approx(3 * 4 * (full - scores) + scores)
    both = rc("selective", modules=("core_attn", "mlp"))
    assert on_stage(both) == pytest.approx(3 * 4 * (full - scores - mlp) + scores + mlp)
    assert rc("full", "block", 1).label == "full (block, 1 layer)"


#: MoE: 4 experts of width 8, top-2, layers 0 and 2 MoE (pattern 1 0 1), a shared expert of 4;
#: SwiGLU, RMSNorm, MHA (h = 8, 2 heads), untied.
MOE = ModelConfig(
    num_layers=3, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, num_experts=4,
    moe_router_topk=2, moe_ffn_hidden_size=8, moe_layer_freq=[1, 0, 1],
    moe_shared_expert_intermediate_size=4,
)  # fmt: skip
ATTENTION = 8 * 24 + 64 + 2 * 8  # QKV, projection, two RMSNorms
EXPERT = 8 * 16 + 8 * 8  # fc1 8 x (2 x 8), fc2 8 x 8
SHARED, ROUTER = 8 * 8 + 4 * 8, 4 * 8
DENSE = ATTENTION + 8 * 32 + 16 * 8


def test_moe_params_by_hand() -> None:
    assert planner.layer_params(MOE) == DENSE
    assert planner.layer_params(MOE, moe=True) == ATTENTION + ROUTER + 4 * EXPERT + SHARED
    # EP 2: two local experts; expert TP 2 halves each expert (no biases).
    assert planner.layer_params(MOE, moe=True, ep=2) == ATTENTION + ROUTER + 2 * EXPERT + SHARED
    assert planner.layer_params(MOE, moe=True, ep=2, etp=2) == (
        ATTENTION + ROUTER + 2 * EXPERT // 2 + SHARED
    )
    total = 2 * (ATTENTION + ROUTER + 4 * EXPERT + SHARED) + DENSE + 2 * 16 * 8 + 8
    assert planner.total_params(MOE, 16) == total
    assert planner.active_params(MOE, 16) == total - 2 * (4 - 2) * EXPERT
    assert planner.stage_expert_params(MOE, ep=2) == 2 * 2 * EXPERT
    # PP 3: stage 1 holds the dense layer, stage 2 the last MoE layer, the norm and the output.
    assert planner.stage_params(MOE, 16, pp=3, stage=1, ep=2) == DENSE
    assert planner.stage_expert_params(MOE, pp=3, stage=1, ep=2) == 0


def test_moe_flops_count_the_active_experts() -> None:
    weights = 2 * (ATTENTION - 16 + ROUTER + 2 * EXPERT + SHARED) + (DENSE - 16)
    attention = 3 * 4.0 * 16 * 2 * 4  # layers x 4 s a d
    assert model_flops.forward_flops_per_token(MOE, 16, 32) == 2.0 * (weights + 8 * 32) + attention


def test_moe_dispatch_bytes_by_hand() -> None:
    """A rank routes T = s b / TP = 32 tokens to k = 2 experts; h = 8, 2 bytes (bf16)."""
    a2a = ModelConfig(**{**MOE.__dict__, "moe_token_dispatcher_type": "alltoall"})
    gather = ModelConfig(**{**MOE.__dict__, "moe_token_dispatcher_type": "allgather"})
    # all-to-all: 2 directions x (dispatch + combine) x T k h (EP - 1)/EP
    assert planner.dispatch_bytes_per_layer(a2a, 16, 2, tp=1, ep=4, etp=1, dtype=2) == (
        4 * 32 * 2 * 8 * 3 / 4 * 2
    )
    # all-gather: 2 directions x (gather + reduce-scatter) x (ETP EP - 1) T h
    assert planner.dispatch_bytes_per_layer(gather, 16, 2, tp=1, ep=4, etp=1, dtype=2) == (
        4 * 3 * 32 * 8 * 2
    )


def test_moe_example_plan() -> None:
    """The MoE example: experts' optimizer state sharded over expert DP (64 / EP 8 = 8)."""
    path = ROOT / "examples" / "configs" / "moe_student_dense_teacher.yaml"
    cfg = parse_config(["--config", str(path)])
    result = planner.plan(cfg, 64, 50000, planner.Hardware())
    moe = result.moe
    assert (moe["experts per MoE layer"], moe["experts per rank and layer"]) == (64, 8)
    assert moe["active parameters per token"] == planner.active_params(cfg.model, 50048)
    assert 0.1 < moe["active fraction"] < 0.25 and not result.warnings
    spad = 50048
    params = planner.stage_params(cfg.model, spad, ep=8)
    experts = planner.stage_expert_params(cfg.model, ep=8)
    state = (params - experts) * (6 + 12 / 64) + experts * (6 + 12 / 8)
    assert result.memory["student weights+grads+optimizer"] == pytest.approx(state)
    per_layer = planner.dispatch_bytes_per_layer(cfg.model, 2048, 2, tp=1, ep=8, etp=1, dtype=2)
    assert moe["dispatcher traffic per step and rank"] == per_layer * 24 * result.n_micro
