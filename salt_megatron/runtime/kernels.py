"""Which optional fused GPU kernels this machine has (Transformer Engine, apex extensions).

megatron-core's fusions each need a specific kernel, and a fusion switched on without its kernel
is an error at model build (gradient-accumulation fusion) or config time (RoPE fusion), so the
config adapter asks here first. Megatron-LM makes the same checks in its argument parsing.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FusedKernels:
    """Availability of the optional kernels behind megatron-core's fusions."""

    transformer_engine: bool
    """``transformer_engine.pytorch`` imports (TE layer spec, FP8, fused RoPE)."""
    fused_wgrad: bool
    """apex's ``fused_weight_gradient_mlp_cuda``: megatron's gradient-accumulation fusion in its
    own linear layers (the local spec, and the output layer under every spec)."""
    fused_rope: bool
    """megatron's ``fused_apply_rotary_pos_emb`` (from TE >= 1.4): RoPE fusion."""


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken CUDA extension raising at import
        return False
    return True


@functools.lru_cache(maxsize=1)
def fused_kernels() -> FusedKernels:
    """Probe once per process."""
    rope = False
    try:
        from megatron.core.models.common.embeddings import rope_utils

        rope = rope_utils.fused_apply_rotary_pos_emb is not None
    except Exception:
        rope = False
    return FusedKernels(
        transformer_engine=_imports("transformer_engine.pytorch"),
        fused_wgrad=_imports("fused_weight_gradient_mlp_cuda"),
        fused_rope=rope,
    )
