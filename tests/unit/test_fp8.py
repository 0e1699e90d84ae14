"""FP8 decisions that can be checked without Transformer Engine or a GPU.

* The frozen teacher's FP8-only weights never use delayed scaling (they would be quantised at the
  initial scale 1.0 and never re-quantised); the float8 arithmetic below shows what that costs.
* Support checks on any TE release: a recipe the installed TE lacks is a clear error, never an
  ``AttributeError``. TE cannot be installed here, so each release's module layout (names read
  from TE's source at that release tag) is stood in for by empty modules in ``sys.modules``.
* A released teacher leaves nothing in TE's global FP8 state.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from salt_megatron.config import megatron as mcfg
from salt_megatron.config import parse_config
from salt_megatron.models import fp8

FP8_RUN = ["--mock-data", "--vocab-size", "200", "--fp8-format", "e4m3",
           "--transformer-impl", "transformer_engine"]  # fmt: skip


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_teacher_fp8_weights_are_scaled_from_their_values(recipe: str) -> None:
    cfg = parse_config([*FP8_RUN, "--fp8-recipe", recipe])
    student = mcfg.student_transformer_config(cfg)
    teacher = mcfg.teacher_transformer_config(cfg, cfg.teacher)
    assert (student.fp8_recipe, student.fp8_param) == (recipe, False)
    assert teacher.fp8_param and teacher.fp8_recipe != "delayed"
    assert teacher.fp8_recipe == ("tensorwise" if recipe == "delayed" else recipe)


def test_e4m3_at_scale_one_loses_a_small_teacher_weight() -> None:
    """Why: a weight of std 3e-3 cast to E4M3 at scale 1 vs at its per-tensor current scale."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w *= 3e-3

    def roundtrip(scale: float) -> torch.Tensor:
        return (w * scale).to(torch.float8_e4m3fn).to(torch.float64) / scale

    at_one = roundtrip(1.0)
    current = roundtrip(448.0 / float(w.abs().max()))  # E4M3's largest value over the amax
    rel = [float((q - w).norm() / w.norm()) for q in (at_one, current)]
    zeros = [float((q == 0).double().mean()) for q in (at_one, current)]
    assert zeros[0] > 0.15 and rel[0] > 0.1, (zeros, rel)  # ~a fifth of the weights vanish
    assert zeros[1] < 0.01 and rel[1] < 0.05, (zeros, rel)


def _te_release(monkeypatch: Any, version: str, recipes: list[str], legacy: list[str],
                top_level: list[str]) -> dict[str, list[Any]]:  # fmt: skip
    """Stand in for one TE release's layout; record the support checks that get called."""
    calls: dict[str, list[Any]] = {}

    def check(name: str) -> Any:
        def run(**kwargs: Any) -> tuple[bool, str]:
            calls.setdefault(name, []).append(kwargs)
            return True, ""

        return run

    te = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    legacy_fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    common = types.ModuleType("transformer_engine.common")
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    for name in recipes:
        setattr(recipe_mod, name, type(name, (), {}))
    for name in legacy:
        setattr(legacy_fp8, name, check(name))
    for name in top_level:
        setattr(pytorch, name, check(name))
    modules = {"transformer_engine": te, "transformer_engine.pytorch": pytorch,
               "transformer_engine.pytorch.fp8": legacy_fp8,
               "transformer_engine.common": common,
               "transformer_engine.common.recipe": recipe_mod}  # fmt: skip
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8, "te_version", lambda: version)
    return calls


def test_recipes_missing_from_an_older_te_are_clear_errors(monkeypatch: Any) -> None:
    """TE 2.2: current scaling but no block scaling (2.3) and no top-level checks (2.9)."""
    calls = _te_release(
        monkeypatch, "2.2.0",
        recipes=["DelayedScaling", "MXFP8BlockScaling", "Float8CurrentScaling"],
        legacy=["check_fp8_support", "check_mxfp8_support"], top_level=[],
    )  # fmt: skip
    fp8.check_fp8("e4m3", "delayed")
    fp8.check_fp8("e4m3", "tensorwise")
    fp8.check_fp8("e4m3", "mxfp8")
    assert sorted(calls) == ["check_fp8_support", "check_mxfp8_support"]
    with pytest.raises(fp8.FP8Unavailable, match=r"blockwise needs Transformer Engine >= 2\.3"):
        fp8.check_fp8("e4m3", "blockwise")


def test_te_2_1_has_no_current_scaling_for_the_teacher(monkeypatch: Any) -> None:
    _te_release(monkeypatch, "2.1.0", recipes=["DelayedScaling", "MXFP8BlockScaling"],
                legacy=["check_fp8_support", "check_mxfp8_support"], top_level=[])  # fmt: skip
    teacher_recipe = mcfg.teacher_fp8_recipe("delayed")
    with pytest.raises(fp8.FP8Unavailable, match=r"tensorwise needs Transformer Engine >= 2\.2"):
        fp8.check_fp8("hybrid", teacher_recipe)


def test_te_2_9_top_level_checks_are_preferred(monkeypatch: Any) -> None:
    calls = _te_release(
        monkeypatch, "2.9.0",
        recipes=["DelayedScaling", "MXFP8BlockScaling", "Float8CurrentScaling",
                 "Float8BlockScaling"],
        legacy=[], top_level=["is_fp8_available", "is_fp8_block_scaling_available"],
    )  # fmt: skip
    fp8.check_fp8("e4m3", "blockwise")
    assert calls == {"is_fp8_block_scaling_available": [{"return_reason": True}]}


def test_released_teacher_leaves_no_global_fp8_state() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].fp8_meta = {"recipe": "current", "scaling_fwd": object()}  # type: ignore[assignment]
    assert fp8.release_fp8_state(model) == 1 and model[0].fp8_meta == {}
    model[1].fp8_meta = {"buffer_index_and_autocast_key": (0, "forward_delayed")}  # type: ignore[assignment]
    with pytest.raises(fp8.FP8StateError, match="teacher module 1 is registered"):
        fp8.release_fp8_state(model)
