"""A fake accelerator on a CPU-only machine: CUDA's API answers, tensors live off the host.

Two tiers (measured limits in ``docs/architecture.md``, "What the fake-accelerator tier covers"):

* :func:`install_meta_cuda` -- **meta posing as CUDA**. ``torch.cuda`` reports one GPU, and
  every tensor megatron-core or this package puts "on the GPU" (``device="cuda"``, an int device
  index, ``.cuda()``, ``.to(cuda)``) is created on the ``meta`` device instead. Meta tensors
  have shapes and dtypes but no data, run forward *and* backward, and any op that mixes them
  with a host tensor raises ("Tensor on device cpu is not on the expected device meta!"): a
  tensor left on the CPU fails the run. Reading a meta tensor on the host (``.item()``,
  ``.tolist()``, ``.cpu()``, ``bool()``...) is a device->host synchronisation on a real GPU:
  the harness counts it in :data:`SYNCS` (with the caller's file and line) and returns a
  placeholder (zeros), so whole steps run and tests assert how many syncs each part made.
* :func:`fake_cuda` -- ``FakeTensorMode`` tensors whose device *is* ``cuda:0``. On a CPU-only
  torch build many ops fail on them in C++ before the fake dispatch (``copy_``, ``.contiguous()``
  of a transposed tensor, ``torch.stack``, slice assignment: "PyTorch is not linked with support
  for cuda devices"), and autograd aborts the process, so it serves model *construction* only:
  every parameter must report a ``cuda`` device.

Stubs, all confined to the test process that installs them (never in the package):

* ``torch.cuda.{is_available, device_count, current_device, set_device}``: one device, index 0.
* ``torch.cuda.{synchronize, Event, current_stream, Stream}``: host waits are counted as syncs;
  ``Event.elapsed_time`` is one too (it needs the end event complete).
* CUDA RNG (``torch.cuda.{get,set}_rng_state``, ``manual_seed[_all]`` and megatron's
  ``_get/_set_cuda_rng_state``) is routed to the CPU generator: there is no device generator.
* memory statistics (``memory_allocated`` ...) read 0; ``empty_cache`` does nothing.
* ``Tensor.pin_memory`` returns the tensor and records that it was pinned (pinning needs a real
  CUDA driver); the data pipeline's pinning is asserted through :data:`PINNED`.
  ``torch.accelerator.{is_available, current_accelerator, current_device_index,
  set_device_index, current_stream}`` answer for one "cuda" device (the DataLoader's pinning
  thread and ``torch.optim``'s graph-capture check ask).
* megatron's ``dist_checkpointing.load`` and the teacher's ``untrusted.load_sharded`` (only where
  a test asks, :func:`stub_checkpoint_load`):
  torch's DCP refuses to load into meta tensors. The stub returns, for each requested shard, an
  empty tensor of its shape, dtype and device (real loading is covered by the CPU tiers).
* megatron's gradient-norm fallback for machines without TE and apex
  (``clip_grads.l2_norm_impl``) is replaced by the device-side computation TE's fused
  ``multi_tensor_l2norm`` performs: the fallback reads every parameter's norm on the host.
* mixture-of-experts routing (only where a test asks, :func:`balanced_moe_routing`): which
  tokens go to which expert is data, and meta tensors hold none. ``aten::masked_select`` (the
  token permutation) gets a meta kernel that returns the size a balanced top-k routing gives
  (``k / E`` of the mask's entries), and the all-to-all dispatcher's split sizes, which
  megatron copies to the host at its ``cuda_dtoh_point``, take a balanced routing's values
  there. megatron's own wait for those copies (``d2h_event.synchronize()``) runs unchanged and
  is counted.
* Process groups are gloo (this torch has no NCCL): collectives on meta tensors check shapes
  only. c10d's *coalesced* all-reduce has no meta kernel, so megatron's bucketed gradient
  reduction (``param_and_grad_buffer._coalescing_manager``) issues its collectives one by one,
  and ``torch.distributed.batch_isend_irecv`` (megatron's pipeline p2p on GPUs; it asks the
  group for a backend of the tensors' device, and there is none for ``meta``) issues its
  operations one by one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

META = torch.device("meta")
_HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
}


@dataclass(frozen=True)
class Sync:
    """One device->host synchronisation: what forced it, and the first caller outside torch."""

    kind: str
    where: str


class SyncLog:
    """Host synchronisations seen since :meth:`clear` (``kind`` and ``file:line``)."""

    def __init__(self) -> None:
        self.events: list[Sync] = []

    def record(self, kind: str) -> None:
        self.events.append(Sync(kind, _caller()))

    def clear(self) -> None:
        self.events.clear()

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[Sync]]:
        """Collect the syncs of a block into the yielded list."""
        start = len(self.events)
        found: list[Sync] = []
        try:
            yield found
        finally:
            found.extend(self.events[start:])

    def in_files(self, *fragments: str) -> list[Sync]:
        """The syncs whose caller's path contains one of ``fragments``."""
        return [e for e in self.events if any(f in e.where for f in fragments)]


SYNCS = SyncLog()
PINNED: list[tuple[int, ...]] = []
"""Shapes of the tensors ``pin_memory()`` was called on."""


def _caller() -> str:
    """``file:line`` of the innermost frame of this repository's or megatron's code."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        path = frame.filename
        if "/torch/" in path or path.endswith("harness.py"):
            continue
        return f"{path}:{frame.lineno}"
    return "?"


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _placeholder(kind: str, t: torch.Tensor) -> Any:
    zeros = torch.zeros(t.shape, dtype=t.dtype)
    if kind in ("int", "index"):
        return 0
    if kind == "float":
        return 0.0
    if kind == "item":
        return zeros.reshape(-1)[0].item() if t.numel() else 0
    if kind == "bool":
        return False
    if kind == "tolist":
        return zeros.tolist()
    if kind == "numpy":
        return zeros.numpy()
    return zeros


class MetaCudaMode(TorchFunctionMode):
    """Sends every CUDA placement to ``meta``; counts and answers host reads of meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        kind = _HOST_READS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            SYNCS.record(kind)
            return _placeholder(kind, args[0])
        if func is torch.Tensor.cuda:
            return args[0].to(META)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].is_meta:
            return f"torch.cuda.{_TYPE_NAMES.get(args[0].dtype, 'FloatTensor')}"
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": META}
        if func is torch.Tensor.to and args:
            to_host = any(
                (isinstance(a, torch.device) and a.type == "cpu")
                or (isinstance(a, str) and a.startswith("cpu"))
                for a in (*args[1:], kwargs.get("device"))
            )
            if to_host and args[0].is_meta:
                SYNCS.record("to(cpu)")
                return _placeholder("cpu", args[0])
            args = tuple(META if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


_TYPE_NAMES = {
    torch.float32: "FloatTensor",
    torch.float16: "HalfTensor",
    torch.bfloat16: "BFloat16Tensor",
    torch.int64: "LongTensor",
    torch.int32: "IntTensor",
}


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        SYNCS.record("Event.synchronize")

    def query(self) -> bool:
        return True

    def wait(self, *args: Any) -> None:
        pass

    def elapsed_time(self, end: Any) -> float:
        SYNCS.record("Event.elapsed_time")
        return 0.0


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _Event()

    def synchronize(self) -> None:
        SYNCS.record("Stream.synchronize")

    def is_capturing(self) -> bool:
        return False

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _cuda_stubs() -> dict[str, Any]:
    def rng_get(*_a: Any, **_k: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def rng_set(state: torch.Tensor, *_a: Any, **_k: Any) -> None:
        torch.set_rng_state(state)

    def seed(value: int) -> None:
        torch.default_generator.manual_seed(int(value))

    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda *_: None,
        "synchronize": lambda *_a, **_k: SYNCS.record("torch.cuda.synchronize"),
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda *_a: _Stream(),
        "default_stream": lambda *_a: _Stream(),
        "stream": lambda *_a: contextlib.nullcontext(),
        "get_rng_state": rng_get,
        "set_rng_state": rng_set,
        "manual_seed": seed,
        "manual_seed_all": seed,
        "memory_allocated": lambda *_: 0,
        "max_memory_allocated": lambda *_: 0,
        "memory_reserved": lambda *_: 0,
        "max_memory_reserved": lambda *_: 0,
        "reset_peak_memory_stats": lambda *_: None,
        "empty_cache": lambda: None,
        "get_device_name": lambda *_: "fake accelerator",
        "get_device_capability": lambda *_: (9, 0),
    }


def _pin_memory(self: torch.Tensor, *_args: Any) -> torch.Tensor:
    PINNED.append(tuple(self.shape))
    return self


def _install_cuda_api() -> None:
    for name, value in _cuda_stubs().items():
        setattr(torch.cuda, name, value)
    # torch.utils.data asks torch.accelerator whether (and for which device) to pin memory.
    torch.accelerator.is_available = lambda: True  # type: ignore[assignment]
    torch.accelerator.current_accelerator = lambda *_a, **_k: torch.device("cuda")  # type: ignore[assignment]
    torch.accelerator.current_device_index = lambda: 0  # type: ignore[assignment]
    torch.accelerator.set_device_index = lambda *_: None  # type: ignore[assignment]
    torch.accelerator.current_stream = lambda *_: _Stream()  # type: ignore[assignment]
    torch.Tensor.pin_memory = _pin_memory  # type: ignore[method-assign,assignment]
    torch._dynamo.config.disable = True  # type: ignore[attr-defined]
    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = _cuda_stubs()["get_rng_state"]
    mc_random._set_cuda_rng_state = _cuda_stubs()["set_rng_state"]


def stub_checkpoint_load() -> None:
    """Make ``dist_checkpointing.load`` and the teacher's loader
    (:func:`salt_megatron.checkpoint.untrusted.load_sharded`) return shape-faithful empty shards
    (DCP cannot load meta).

    The returned tensors follow each requested shard's shape, dtype and device, through
    megatron's own pre-processing and factory merges, so ``load_state_dict(strict=True)`` still
    checks every key of the model against the request.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    from salt_megatron.checkpoint import untrusted

    def load(sharded: dict[str, Any], checkpoint_dir: str, *_a: Any, **_k: Any) -> Any:
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(checkpoint_dir)
        sharded, nonpersistent, factories = load_preprocess(sharded)
        sharded, _ = extract_sharded_base(sharded)

        def empty(x: Any) -> Any:
            return torch.empty_like(x.data) if isinstance(x, ShardedTensor) else None

        loaded = dict_list_map_inplace(empty, sharded)
        merge(loaded, nonpersistent)
        return apply_factory_merges(loaded, factories)

    dist_checkpointing.load = load
    untrusted.load_sharded = load  # type: ignore[assignment]


class _Issued:
    """What ``_coalescing_manager`` yields: the collectives already ran one by one."""

    def wait(self) -> None:
        pass


@contextlib.contextmanager
def _one_by_one(*_args: Any, **_kwargs: Any) -> Iterator[_Issued]:
    yield _Issued()


def _p2p_one_by_one(ops: list[Any]) -> list[Any]:
    """``batch_isend_irecv`` as the individual ``isend``/``irecv`` calls, in order."""
    return [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]


def _device_l2_norm(
    chunk_size: int,
    noop_flag: Any,
    tensor_lists: list[list[torch.Tensor]],
    per_tensor: bool,
    *_a: Any,
) -> tuple[torch.Tensor, None]:
    """What TE's / apex's fused ``multi_tensor_l2norm`` computes, without leaving the device."""
    norms = torch.stack([torch.linalg.vector_norm(t.float()) for ts in tensor_lists for t in ts])
    return torch.linalg.vector_norm(norms).reshape(1), None


def balanced_moe_routing(topk: int, num_experts: int) -> None:
    """Let megatron's MoE token dispatch run on meta tensors, as under a balanced routing.

    Every token goes to ``topk`` of the ``num_experts`` experts and every expert gets the same
    number of tokens. Only the all-to-all dispatcher is covered (dropless, no fused
    permutation); the all-gather one copies its per-expert counts to the host with ``.cpu()``,
    whose placeholder (zeros) cannot size its permutation.
    """
    import numpy as np
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    lib = torch.library.Library("aten", "IMPL")  # a kernel for the meta dispatch key only
    _LIBRARIES.append(lib)

    def masked_select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.numel() * topk // num_experts
        return values.new_empty((n,))

    lib.impl("masked_select", masked_select, "Meta")
    original = MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize

    def dtoh(self: Any, point: str, tokens_per_expert: Any = None) -> Any:
        out = original(self, point, tokens_per_expert)
        if point != self.cuda_dtoh_point or not torch.is_tensor(out) or not out.is_meta:
            return out
        assigned = int(self.num_out_tokens)  # this rank's tokens x topk (dropless: static)
        ranks, local = self.tp_size * self.ep_size, self.num_local_experts
        per_expert = assigned // num_experts  # from each rank to each expert
        self.input_splits = np.full(self.ep_size, assigned // self.ep_size)
        self.output_splits = np.full(self.ep_size, per_expert * local)
        self.output_splits_tp = np.full(self.tp_size, per_expert * local * self.ep_size)
        self.num_global_tokens_per_local_expert = torch.full((ranks, local), per_expert)
        return torch.full((local,), per_expert * ranks)

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh  # type: ignore[method-assign]


_LIBRARIES: list[Any] = []
"""Kernel registrations kept alive for the process (a dropped ``Library`` unregisters them)."""


def install_meta_cuda() -> None:
    """Make this process see one CUDA device whose tensors are meta tensors (irreversible)."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads

    _install_cuda_api()
    # Without TE and apex, megatron's grad-norm fallback builds a host tensor from per-tensor
    # norms (a host read per parameter). GPU clusters run TE's fused kernel; stand in for it.
    clip_grads.l2_norm_impl = _device_l2_norm
    # c10d's coalesced all-reduce has no meta kernel (each single collective has one): megatron's
    # bucketed gradient reduction issues its collectives one by one here.
    param_and_grad_buffer._coalescing_manager = _one_by_one  # type: ignore[assignment]
    torch.distributed.batch_isend_irecv = _p2p_one_by_one  # type: ignore[assignment]
    MetaCudaMode().__enter__()


# ---- FakeTensorMode: construction only ---------------------------------------------------------
class _FakeMoves(TorchFunctionMode):
    """Int device indices mean CUDA; ``.to(cuda)``/``.cuda()`` of a fake tensor re-creates it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if isinstance(kwargs.get("device"), int) and not isinstance(kwargs["device"], bool):
            kwargs = {**kwargs, "device": torch.device("cuda", kwargs["device"])}
        if func is torch.Tensor.copy_ and args[0].device.type == "cuda":
            # copy_ into a fake cuda tensor fails in C++ on a CPU-only build; it may cross devices
            # (a host->device copy), so only the shapes are checked.
            torch.broadcast_shapes(args[0].shape, args[1].shape)
            return args[0]
        if func is torch.Tensor.cuda or (
            func is torch.Tensor.to
            and any(_is_cuda(a) for a in (*args[1:], kwargs.get("device")) if a is not None)
        ):
            src = args[0]
            dtype = kwargs.get("dtype") or next(
                (a for a in args[1:] if isinstance(a, torch.dtype)), src.dtype
            )
            if src.device.type == "cuda" and dtype == src.dtype:
                return src
            with torch.no_grad():
                return torch.empty_like(src, device="cuda", dtype=dtype)
        return func(*args, **kwargs)


def _rebind_apply(self: torch.nn.Module, fn: Callable[..., Any], recurse: bool = True) -> Any:
    """``Module._apply`` for fake parameters: FakeTensorMode holds weakrefs to them, so torch's
    ``swap_tensors`` refuses; re-bind each converted parameter (keeping its attributes)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            new = fn(param)
        if new is not param:
            moved = torch.nn.Parameter(new, requires_grad=param.requires_grad)
            for name, value in param.__dict__.items():  # megatron's attributes, not fake state
                moved.__dict__.setdefault(name, value)
            self._parameters[key] = moved
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """FakeTensorMode with ``cuda:0`` tensors, for building models (see the module docstring).

    Needs :func:`install_fake_cuda_process` first. Object collectives (``all_gather_object``)
    pickle into byte tensors and read sizes with ``.item()``: they run outside the fake mode.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), _FakeMoves():
        yield


def install_fake_cuda_process() -> None:
    """Process-wide stubs for :func:`fake_cuda` (irreversible)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as mc_random
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    _install_cuda_api()
    torch.nn.Module._apply = _rebind_apply  # type: ignore[method-assign]

    @contextlib.contextmanager
    def fork(self: Any, name: str = "") -> Iterator[None]:
        # megatron's tracker compares host RNG states with .item(): data-dependent in fake mode.
        yield

    mc_random.CudaRNGStatesTracker.fork = fork  # type: ignore[method-assign,assignment]

    def host(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily():
                return fn(*args, **kwargs)

        return run

    for name in ("all_gather_object", "broadcast_object_list", "gather_object"):
        setattr(dist, name, host(getattr(dist, name)))


# ---- processes ---------------------------------------------------------------------------------
def init_process(tier: str) -> None:
    """Worker set-up for :func:`tests.distributed.launcher.run_distributed`'s ``setup`` hook.

    Installs the tier before torch.distributed starts, then starts gloo (this torch has no NCCL;
    :func:`salt_megatron.runtime.init_distributed` would pick it once CUDA is reported).
    """
    import torch.distributed as dist

    from salt_megatron.runtime.quiet import silence_known_warnings

    silence_known_warnings()
    if tier == "meta":
        install_meta_cuda()
    elif tier == "fake":
        install_fake_cuda_process()
    else:
        raise ValueError(tier)
    dist.init_process_group(
        "gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
    )


def assert_on_device(module: torch.nn.Module, device_type: str) -> None:
    """Every parameter and buffer of ``module`` is on ``device_type``; names the strays."""
    stray = [
        f"{name} ({t.device})"
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device.type != device_type
    ]
    assert not stray, f"left off the {device_type} device: {', '.join(stray)}"


def log_syncs(events: list[Sync]) -> str:
    """A readable list of syncs for assertion messages."""
    return "\n".join(f"  {e.kind} at {e.where}" for e in events) or "  none"


def flush() -> None:
    """Flush stdout/stderr (workers die hard if autograd meets a fake tensor)."""
    sys.stdout.flush()
    sys.stderr.flush()
