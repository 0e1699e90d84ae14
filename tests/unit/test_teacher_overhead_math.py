"""benchmarks/teacher_overhead.py's FLOP-ideal ratio and LM-head share against hand computations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from salt_megatron.config.schema import ModelConfig

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "teacher_overhead.py"
_spec = importlib.util.spec_from_file_location("teacher_overhead", PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["teacher_overhead"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def _fwd(layers: int, h: int, ffn: int, seq: int, vocab: int) -> float:
    """Forward FLOPs/token of an MHA SwiGLU GPT by hand: 2 x (QKV + proj + gate/up + down + head)
    weights, plus 4 s h per layer for QK^T and AV."""
    per_layer = h * 3 * h + h * h + h * 2 * ffn + ffn * h
    return 2.0 * (layers * per_layer + h * vocab) + layers * 4.0 * seq * h


def test_flop_ideal_ratio_by_hand() -> None:
    # ffn = 8/3 h rounded up to a multiple of 64: 704 for h=256, 384 for h=128.
    student = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4)
    teacher = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4)
    s_fwd = _fwd(4, 256, 704, 128, 8192)
    t_fwd = _fwd(2, 128, 384, 128, 8192)
    assert s_fwd == 2 * (4 * 802816 + 256 * 8192) + 4 * 4 * 128 * 256
    want = 1.0 + t_fwd / (3.0 * s_fwd)
    assert bench.flop_ideal_ratio(student, teacher, 128, 8192) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(1.09216, abs=1e-5)
    assert bench.head_share(teacher, 128, 8192) == pytest.approx(2 * 128 * 8192 / t_fwd)


def test_ratio_is_one_plus_a_third_for_a_student_sized_teacher() -> None:
    model = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4)
    assert bench.flop_ideal_ratio(model, model, 64, 512) == pytest.approx(4.0 / 3.0)


def test_shape_parse_and_flags() -> None:
    shape = bench.Shape.parse("4x192x4")
    assert (shape.layers, shape.hidden, shape.heads, str(shape)) == (4, 192, 4, "4L h192")
    assert shape.flags("teacher-")[:2] == ["--teacher-num-layers", "4"]


def test_layout_parse() -> None:
    assert bench.Layout.parse("2:2:1") == bench.Layout(2, 2, 1, 1)
    lay = bench.Layout.parse("4:1:1:4")
    assert lay.pp == 4 and lay.placements == ("balanced", "last")
    assert lay.flags()[2:4] == ["--pipeline-model-parallel-size", "4"]
    assert bench.Layout.parse("1:1:1").placements == ("balanced",)
    with pytest.raises(ValueError, match="world:TP"):
        bench.Layout.parse("4:1")


def test_pipeline_summary_against_pp1() -> None:
    def row(text: str, place: str, ratio: float, paired: float) -> dict:
        return {"layout": bench.Layout.parse(text), "placement": place, "student": "8L",
                "teacher": "4L", "ratio": ratio, "paired": paired}  # fmt: skip

    rows = [row("1:1:1", "balanced", 1.2, 1.25), row("4:1:1:4", "balanced", 1.32, 1.25),
            row("4:1:1:4", "last", 1.8, 1.9)]  # fmt: skip
    lines = bench.pipeline_summary(rows).splitlines()
    assert lines[0].startswith("- PP 4, teacher balanced over the stages: KD/plain 1.32")
    assert "x1.10 (median x1.00); target <= x1.15: met" in lines[0]
    assert "on the last stage" in lines[1] and "x1.50 (median x1.52)" in lines[1]
    assert "target" not in lines[1]
    assert "not met" in bench.pipeline_summary([rows[0], row("2:1:1:2", "balanced", 1.5, 1.2)])
