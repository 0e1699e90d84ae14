"""FP8 availability checks (Transformer Engine), run before any model is built; FP8 teardown.

megatron-core does the FP8 work itself once ``TransformerConfig.fp8``/``fp8_recipe`` (and for the
teacher ``fp8_param``) are set and the TE layer spec is used: ``fp8_utils.get_fp8_context`` wraps
each layer's forward in TE's FP8 autocast and, with ``fp8_param``, the layer construction in
``fp8_model_init(recipe=...)`` (FP8-only weights). This module answers, with a clear error,
whether the asked-for format and recipe can run here, on any TE release (the support checks
moved between releases), and checks the teacher leaves no state in TE's global FP8 manager.

TE facts used (read from TE's source per release tag): recipes ``DelayedScaling`` (all),
``MXFP8BlockScaling`` (2.0), ``Float8CurrentScaling`` (2.2), ``Float8BlockScaling`` (2.3);
``fp8_model_init`` takes ``recipe`` from 2.0; support checks are
``transformer_engine.pytorch.fp8.check_*_support() -> (bool, reason)`` before 2.9 and
``transformer_engine.pytorch.is_*_available(return_reason=True)`` from 2.9; only delayed scaling
registers a module in ``FP8GlobalStateManager``'s global amax buffers (2.2+), with no API to
remove it again. None of this has run here (no CUDA, no TE): see ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from salt_megatron.config.schema import ConfigError


@dataclass(frozen=True)
class _Recipe:
    min_te: tuple[int, int]
    recipe_class: str  # in transformer_engine.common.recipe
    check: str  # TE >= 2.9: transformer_engine.pytorch.<check>(return_reason=True)
    legacy_check: str  # TE < 2.9: transformer_engine.pytorch.fp8.<legacy_check>()


_RECIPES = {
    "delayed": _Recipe((1, 0), "DelayedScaling", "is_fp8_available", "check_fp8_support"),
    "tensorwise": _Recipe((2, 2), "Float8CurrentScaling", "is_fp8_available", "check_fp8_support"),
    "blockwise": _Recipe(
        (2, 3),
        "Float8BlockScaling",
        "is_fp8_block_scaling_available",
        "check_fp8_block_scaling_support",
    ),
    "mxfp8": _Recipe((2, 0), "MXFP8BlockScaling", "is_mxfp8_available", "check_mxfp8_support"),
}


class FP8Unavailable(ConfigError):
    """FP8 was asked for but Transformer Engine or the GPU cannot run it."""


def _import_te() -> Any:
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:
        raise FP8Unavailable(
            f"--fp8-format needs Transformer Engine, which cannot be imported ({exc}); install "
            f"it (the NVIDIA PyTorch container, or pip install 'salt-megatron[gpu]') or drop "
            f"--fp8-format"
        ) from None
    return te


def te_version() -> str:
    """The installed Transformer Engine's version string ("unknown" if it has no metadata)."""
    for dist in ("transformer_engine", "transformer-engine"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _support_check(te: Any, recipe: str) -> Callable[[], tuple[bool, str]]:
    """TE's own support check for ``recipe``; :class:`FP8Unavailable` if this TE lacks it."""
    spec = _RECIPES[recipe]
    missing = FP8Unavailable(
        f"--fp8-recipe {recipe} needs Transformer Engine >= {spec.min_te[0]}.{spec.min_te[1]} "
        f"({spec.recipe_class}); this is Transformer Engine {te_version()}: upgrade it or use "
        f"another --fp8-recipe"
    )
    try:
        recipes = importlib.import_module("transformer_engine.common.recipe")
    except Exception:
        raise missing from None
    if not hasattr(recipes, spec.recipe_class):
        raise missing
    new = getattr(te, spec.check, None)
    if new is not None:
        return lambda: new(return_reason=True)  # type: ignore[no-any-return]
    try:
        legacy = importlib.import_module("transformer_engine.pytorch.fp8")
    except Exception:
        raise missing from None
    check = getattr(legacy, spec.legacy_check, None)
    if check is None:
        raise missing
    return check  # type: ignore[no-any-return]


def check_fp8(fp8_format: str | None, fp8_recipe: str) -> None:
    """Raise :class:`FP8Unavailable` unless ``fp8_format``/``fp8_recipe`` can run on this GPU.

    No-op when ``fp8_format`` is None. Needs CUDA and a TE release that has the recipe; uses
    TE's own support check for it (compute capability, CUDA/cuBLAS versions).
    """
    if fp8_format is None:
        return
    if fp8_recipe not in _RECIPES:
        raise FP8Unavailable(f"--fp8-recipe {fp8_recipe!r}: not one of {sorted(_RECIPES)}")
    te = _import_te()
    if not torch.cuda.is_available():
        raise FP8Unavailable(f"--fp8-format {fp8_format} needs a CUDA GPU; none is visible")
    ok, reason = _support_check(te, fp8_recipe)()
    if not ok:
        raise FP8Unavailable(
            f"--fp8-format {fp8_format} --fp8-recipe {fp8_recipe}: this GPU cannot run it "
            f"({reason or 'Transformer Engine reports no support'})"
        )


class FP8StateError(RuntimeError):
    """A released model left entries in Transformer Engine's global FP8 state."""


def release_fp8_state(model: torch.nn.Module) -> int:
    """Drop ``model``'s per-module FP8 metadata before it is freed; returns the modules cleared.

    TE keeps, per module, ``fp8_meta`` (recipe state: scales, amax histories, quantizers).
    Under *delayed* scaling TE also appends a module's amax and scale tensors to
    ``FP8GlobalStateManager``'s global buffers (strong references, no removal API), and every
    later FP8 step would keep reducing them. The teacher never runs under delayed scaling
    (:func:`salt_megatron.config.megatron.teacher_fp8_recipe`), so it must never have been
    registered there: a registration is an :class:`FP8StateError` naming the module (a TE
    release that changed the rule), not something to leave behind silently.
    """
    cleared = 0
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None)
        if not isinstance(meta, dict):
            continue
        if meta.get("buffer_index_and_autocast_key") is not None:
            raise FP8StateError(
                f"teacher module {name or '<root>'} is registered in Transformer Engine's global "
                f"FP8 amax buffers (TE {te_version()} registered a non-delayed recipe); its "
                f"amaxes would be reduced by every later FP8 step"
            )
        meta.clear()
        cleared += 1
    return cleared
