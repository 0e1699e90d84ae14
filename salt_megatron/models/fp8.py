"""FP8 availability checks (Transformer Engine), run before any model is built.

megatron-core does the FP8 work itself once ``TransformerConfig.fp8``/``fp8_recipe`` (and for the
teacher ``fp8_param``) are set and the TE layer spec is used: ``fp8_utils.get_fp8_context`` wraps
each layer's forward in ``transformer_engine.pytorch.fp8_autocast`` and, with ``fp8_param``, the
layer construction in ``fp8_model_init`` (FP8-only weights). This module only answers, with a
clear error, whether the asked-for format and recipe can run here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from salt_megatron.config.schema import ConfigError

# recipe -> (TE >= 2.8 name in transformer_engine.pytorch, older name in ...pytorch.fp8)
_SUPPORT_CHECKS = {
    "delayed": ("is_fp8_available", "check_fp8_support"),
    "tensorwise": ("is_fp8_available", "check_fp8_support"),
    "blockwise": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
    "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
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


def _support_check(te: Any, recipe: str) -> Callable[[], tuple[bool, str]]:
    new_name, old_name = _SUPPORT_CHECKS[recipe]
    new = getattr(te, new_name, None)
    if new is not None:
        return lambda: new(return_reason=True)  # type: ignore[no-any-return]
    from transformer_engine.pytorch import fp8 as te_fp8

    return getattr(te_fp8, old_name)  # type: ignore[no-any-return]


def check_fp8(fp8_format: str | None, fp8_recipe: str) -> None:
    """Raise :class:`FP8Unavailable` unless ``fp8_format``/``fp8_recipe`` can run on this GPU.

    No-op when ``fp8_format`` is None. Needs CUDA and TE; uses TE's own support check for the
    recipe (compute capability, CUDA/cuBLAS versions).
    """
    if fp8_format is None:
        return
    if fp8_recipe not in _SUPPORT_CHECKS:
        raise FP8Unavailable(f"--fp8-recipe {fp8_recipe!r}: not one of {sorted(_SUPPORT_CHECKS)}")
    te = _import_te()
    import torch

    if not torch.cuda.is_available():
        raise FP8Unavailable(f"--fp8-format {fp8_format} needs a CUDA GPU; none is visible")
    ok, reason = _support_check(te, fp8_recipe)()
    if not ok:
        raise FP8Unavailable(
            f"--fp8-format {fp8_format} --fp8-recipe {fp8_recipe}: this GPU cannot run it "
            f"({reason or 'Transformer Engine reports no support'})"
        )
