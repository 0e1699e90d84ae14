"""Make megatron-core run on a CPU-only machine (gloo backend).

megatron-core assumes CUDA in a few hard-coded places. :func:`enable` redirects exactly those,
and does nothing at all when CUDA is available. Each redirect and why it exists:

1. ``device="cuda"`` literals, ``Tensor.cuda()`` and ``Tensor.to("cuda")`` (pipeline schedules,
   the default causal mask, optimizer, grad clipping, the distributed optimizer): a
   :class:`torch.overrides.TorchFunctionMode` rewrites the cuda device to the CPU.
2. ``Tensor.type()`` string checks (distributed optimizer, ``clip_grads``) expect
   ``torch.cuda.FloatTensor``-style names: the same mode answers the no-argument ``type()`` of a
   CPU tensor with the cuda name.
3. ``torch.cuda.current_device()`` used as a device (tensor-parallel layers, p2p communication,
   grad buffers, rotary embeddings, the dist-checkpoint saver) returns ``torch.device("cpu")``.
4. ``torch.cuda.synchronize`` / ``empty_cache`` become no-ops.
5. RNG: megatron's tracker saves and restores the CUDA RNG state around dropout; it is routed to
   the CPU generator. ``torch.cuda.manual_seed`` seeds the CPU default generator directly
   (aliasing it to ``torch.manual_seed`` would recurse through ``manual_seed_all``).
6. ``torch._dynamo`` is disabled: compiling megatron's jit-scripted helpers costs seconds per
   process on CPU and buys nothing.

Config flags that need fused CUDA kernels (bias-dropout fusion, masked-softmax fusion, gradient
accumulation fusion, RoPE fusion, persistent layer norm) are switched off by the single adapter in
:mod:`salt_megatron.config.megatron`, not here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_ENABLED = False


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites cuda device arguments to the CPU; answers ``type()`` with cuda type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _cpu_rng_get(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def enable() -> bool:
    """Install the redirects when CUDA is absent. Idempotent. Returns True when active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = _cpu_rng_get  # type: ignore[assignment]
    torch.cuda.set_rng_state = _cpu_rng_set  # type: ignore[assignment]
    torch.cuda.manual_seed = _cpu_manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = _cpu_manual_seed  # type: ignore[assignment]
    torch._dynamo.config.disable = True  # type: ignore[attr-defined]

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = _cpu_rng_get
    mc_random._set_cuda_rng_state = _cpu_rng_set
    # The tracker warns whenever the CPU RNG moves inside a fork: on CPU that RNG is the forked one.
    logging.getLogger(mc_random.__name__).setLevel(logging.ERROR)

    _CudaToCpuMode().__enter__()
    _ENABLED = True
    return True


def is_enabled() -> bool:
    """Whether the CPU redirects are active in this process."""
    return _ENABLED
