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
7. Streams and events (mixture-of-experts): megatron's all-to-all token dispatcher creates a
   ``torch.cuda.Stream`` for its device->host copies of the split sizes, records an event on it
   and waits for it. On the host every operation is already complete when it returns, so
   ``torch.cuda.{Stream, current_stream, stream}`` become a stream whose waits, events and
   synchronisations do nothing (:class:`_HostStream`).
8. Uneven list collectives: megatron's all-to-all dispatcher (TP > 1) gathers and
   reduce-scatters tokens over the tensor-parallel group in chunks of different sizes, with
   ``torch.distributed.all_gather`` into a list of uneven tensors and
   ``torch.distributed.reduce_scatter`` from one; gloo refuses the first ("invalid tensor size")
   and implements no reduce-scatter. On a gloo group each runs as one real
   ``all_to_all_single`` (which gloo has): the all-gather sends a rank's tensor to every rank
   (:func:`_gloo_all_gather`, equal sizes keep torch's own), the reduce-scatter sends chunk
   ``j`` to rank ``j`` and sums what it receives (:func:`_gloo_reduce_scatter`). The same
   results, element for element; other backends keep torch's own.
9. The all-to-all dispatcher's split sizes: megatron moves them from the GPU to the host with
   ``maybe_move_tensor_to_cpu(t, as_numpy=True)``, which converts only CUDA tensors; on the CPU
   they stayed tensors, and ``all_to_all_single`` refuses tensor split sizes. The dispatcher's
   reference to it converts host tensors too (:func:`_host_tensor_to_numpy`), as the GPU path
   does after its copy.

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


class _HostEvent:
    """A CUDA event stand-in for host execution: it is complete as soon as it is recorded."""

    def synchronize(self) -> None:
        """Nothing to wait for: host work is finished when the call that queued it returns."""

    def wait(self, stream: Any = None) -> None:
        """Nothing to wait for (see :meth:`synchronize`)."""

    def query(self) -> bool:
        """Always complete."""
        return True


class _HostStream:
    """A CUDA stream stand-in for host execution: every operation runs when it is issued."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        """Nothing to order: host work on every 'stream' is already complete."""

    def wait_event(self, event: Any) -> None:
        """Nothing to wait for (events complete when recorded)."""

    def record_event(self, event: Any = None) -> _HostEvent:
        """A complete event."""
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def __enter__(self) -> _HostStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_HOST_STREAM = _HostStream()


def _host_stream_context(stream: Any = None) -> Any:
    """``torch.cuda.stream(s)``: the operations of the block run on the host as always."""
    return stream if isinstance(stream, _HostStream) else _HOST_STREAM


def _gloo_reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = None,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """``reduce_scatter`` of a list of (uneven) chunks on a gloo group.

    Rank ``r`` must end with the element-wise sum over the group's ranks of their chunk ``r``
    (``input_list[r]``, shaped like ``output``). One ``all_to_all_single`` sends chunk ``j`` to
    rank ``j`` and receives every rank's chunk for this rank, stacked; their sum over ranks is
    the result. Summation only (what megatron asks); other backends use torch's own.
    """
    import torch.distributed as dist

    if dist.get_backend(group) != "gloo":
        return _TORCH_REDUCE_SCATTER(output, input_list, op=op or dist.ReduceOp.SUM,
                                     group=group, async_op=async_op)  # fmt: skip
    if op not in (None, dist.ReduceOp.SUM) or async_op:
        raise NotImplementedError(
            f"reduce_scatter on gloo: only a blocking SUM is redirected (op {op}, async_op "
            f"{async_op})"
        )
    world = dist.get_world_size(group)
    sizes = [t.shape[0] for t in input_list]
    send = torch.cat([t.reshape(t.shape[0], -1) for t in input_list]).contiguous()
    recv = send.new_empty((world * output.shape[0], send.shape[1]))
    dist.all_to_all_single(
        recv, send, output_split_sizes=[output.shape[0]] * world, input_split_sizes=sizes,
        group=group,
    )  # fmt: skip
    summed = recv.reshape(world, output.shape[0], -1).sum(dim=0)
    output.copy_(summed.reshape(output.shape))
    return None


_TORCH_REDUCE_SCATTER: Any = None
_TORCH_ALL_GATHER: Any = None


def _gloo_all_gather(
    tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
    async_op: bool = False,
) -> Any:  # fmt: skip
    """``all_gather`` into a list of tensors of different first dimensions, on a gloo group.

    Rank ``r``'s ``tensor`` ends in ``tensor_list[r]`` of every rank: one ``all_to_all_single``
    in which every rank sends its whole tensor to each rank.
    """
    import torch.distributed as dist

    sizes = [t.shape[0] for t in tensor_list]
    uneven = len(set(sizes)) > 1
    if not uneven or async_op or dist.get_backend(group) != "gloo":
        return _TORCH_ALL_GATHER(tensor_list, tensor, group=group, async_op=async_op)
    world = dist.get_world_size(group)
    row = tensor.reshape(tensor.shape[0], -1)
    send = row.repeat(world, 1).contiguous()
    recv = send.new_empty((sum(sizes), row.shape[1]))
    dist.all_to_all_single(
        recv, send, output_split_sizes=sizes, input_split_sizes=[row.shape[0]] * world,
        group=group,
    )  # fmt: skip
    for out, part in zip(tensor_list, recv.split(sizes), strict=True):
        out.copy_(part.reshape(out.shape))
    return None


def _host_tensor_to_numpy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the host."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


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
    torch.cuda.Stream = _HostStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _HOST_STREAM  # type: ignore[assignment]
    torch.cuda.stream = _host_stream_context  # type: ignore[assignment]

    import torch.distributed as dist

    global _TORCH_REDUCE_SCATTER, _TORCH_ALL_GATHER
    _TORCH_REDUCE_SCATTER, _TORCH_ALL_GATHER = dist.reduce_scatter, dist.all_gather
    dist.reduce_scatter = _gloo_reduce_scatter  # type: ignore[assignment]
    dist.all_gather = _gloo_all_gather  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = _cpu_rng_get
    mc_random._set_cuda_rng_state = _cpu_rng_set
    # The tracker warns whenever the CPU RNG moves inside a fork: on CPU that RNG is the forked one.
    logging.getLogger(mc_random.__name__).setLevel(logging.ERROR)

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor_to_numpy  # type: ignore[assignment]

    _CudaToCpuMode().__enter__()
    _ENABLED = True
    return True


def is_enabled() -> bool:
    """Whether the CPU redirects are active in this process."""
    return _ENABLED
