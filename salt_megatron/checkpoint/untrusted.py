"""Reading dist checkpoints that others wrote (teachers) without running their pickles.

A megatron dist checkpoint holds three pickled things besides JSON and raw tensor bytes:

* torch DCP's ``.metadata`` (``pickle.load`` in ``FileSystemReader.read_metadata``): checked
  first by :func:`dcp_metadata` with an unpickler that only constructs DCP's own metadata
  dataclasses, torch sizes, dtypes and layouts;
* ``ShardedObject`` payloads such as ``_extra_state`` (DCP's planner ``torch.load``\\ s them with
  ``weights_only=False``): :func:`load_weights` never asks for them;
* the common state (``common.pt``, or the DCP object ``common_state`` of newer megatron-core):
  :func:`load_weights` does not read it; :func:`read_common_state` reads it with
  ``torch.load(weights_only=True)`` and an allow-list (megatron-core's own ``SAFE_GLOBALS``,
  ``argparse.Namespace``), the raw bytes fetched from DCP without unpickling.

Tensors are read by DCP as raw storages (``weights_only=True``).
"""

from __future__ import annotations

import argparse
import enum
import io
import os
import pickle
import re
from dataclasses import is_dataclass
from typing import Any

import torch
from torch import nn

from salt_megatron.checkpoint.layout import CheckpointError

COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"
"""DCP key of newer megatron-core's ``ShardedObject("common_state", ..., (1,), (0,))``."""
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


_PLAIN = {
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # a DCP checkpoint_id saved as a path
    ("pathlib", "PurePosixPath"),
    ("torch.serialization", "_get_layout"),  # str -> torch.layout
}


class _MetadataUnpickler(pickle.Unpickler):
    """Constructs only DCP metadata dataclasses/enums, torch sizes, dtypes, layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if is_dataclass(obj) or (isinstance(obj, type) and issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def dcp_metadata(path: str) -> Any:
    """``path/.metadata`` unpickled with the restricted unpickler; a foreign type is an error."""
    meta_path = os.path.join(path, ".metadata")
    try:
        with open(meta_path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint, .metadata is missing") from None
    except Exception as exc:  # a refused type, or garbage
        raise CheckpointError(
            f"{meta_path}: not plain torch-distributed metadata ({type(exc).__name__}: {exc}); "
            "refusing to load it"
        ) from None


def _tensors_only(sharded: Any) -> Any:
    """A sharded state dict without its ``ShardedObject`` entries (pickled payloads)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if not isinstance(sharded, dict):
        return sharded
    return {k: _tensors_only(v) for k, v in sharded.items() if not isinstance(v, ShardedObject)}


def load_sharded(sharded: dict[str, Any], path: str) -> dict[str, Any]:
    """megatron's ``dist_checkpointing.load`` for a teacher: tensors only, no common state.

    Collective over the world (a rank with nothing to read passes ``{}``). The DCP metadata is
    checked first; ``ShardedObject`` entries are dropped from the request; tensors are loaded in
    place where megatron's loader does so. Access-integrity validation is skipped (it gathers the
    whole request on every rank).
    """
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.utils import (
        extract_sharded_base,
        force_all_tensors_to_non_fp8,
    )

    dcp_metadata(path)  # refuses anything but plain DCP metadata before DCP unpickles it
    sharded = _tensors_only(sharded)
    try:
        force_all_tensors_to_non_fp8(sharded)
        sharded, _, factories = load_preprocess(sharded)
        sharded, _ = extract_sharded_base(sharded)
        loaded = TorchDistLoadShardedStrategy().load(sharded, path)
        return dict(apply_factory_merges(loaded, factories))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load the weights ({type(exc).__name__}: {exc})"
        ) from exc


def load_module_state(module: nn.Module, state: dict[str, Any], path: str) -> None:
    """``module.load_state_dict(state)``, strict except for the ``_extra_state`` never read."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights missing {missing}, unexpected {unexpected}")


def load_weights(
    model: nn.Module | None, path: str, metadata: dict[str, Any] | None = None
) -> None:
    """Load a GPT's weights from the dist checkpoint ``path`` (collective over the world).

    Ranks without a model take part with ``None``. ``metadata`` goes to the model's
    ``sharded_state_dict`` (e.g. ``{"dp_cp_group": ...}`` for the replica ids). Any saved
    TP/PP/VPP layout loads (sharded keys are global; the weights' dict key, ``model`` or
    ``model0``..., does not matter); ``_extra_state`` entries are not read.
    """
    if model is None:
        load_sharded({}, path)
        return
    sd = model.sharded_state_dict(metadata=metadata)  # type: ignore[operator]
    load_module_state(model, load_sharded({"model": sd}, path)["model"], path)


def safe_globals() -> list[Any]:
    """Types a common state may construct: megatron-core's allow-list and ``Namespace``."""
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS
    except ImportError:  # older megatron-core
        SAFE_GLOBALS = []
    return [argparse.Namespace, *SAFE_GLOBALS]


def _raw_common_state(path: str) -> bytes:
    """The pickled bytes of the DCP object ``common_state``, fetched without unpickling."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class RawBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.original_state_dict[read_item.dest_index.fqn] = value.read()

    state: dict[str, Any] = {COMMON_STATE_KEY: io.BytesIO()}
    dcp_load(
        state,
        storage_reader=FileSystemReader(path),
        planner=RawBytes(flatten_state_dict=False),
        no_dist=True,
    )
    raw = state[COMMON_STATE_KEY]
    if not isinstance(raw, bytes):
        raise CheckpointError(f"{path}: no {COMMON_FILE} and no common_state object")
    return raw


def read_common_state(path: str) -> dict[str, Any]:
    """The common (non-sharded) state of a dist checkpoint: ``common.pt`` or ``common_state``.

    Unpickled with ``weights_only=True`` and :func:`safe_globals`; any other type is a
    :class:`CheckpointError` naming it.
    """
    dcp_metadata(path)  # refuses anything but plain DCP metadata before DCP unpickles it
    common = os.path.join(path, COMMON_FILE)
    source: Any = common if os.path.isfile(common) else None
    where = common
    if source is None:
        where = f"{path} (common_state)"
        try:
            source = io.BytesIO(_raw_common_state(path))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{path}: no {COMMON_FILE} and no readable common_state ({exc})"
            ) from None
    try:
        with torch.serialization.safe_globals(safe_globals()):
            state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the type {found.group(1)}" if found else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{where}: refusing to unpickle it: it needs {what}, which is not on the allow-list"
        ) from None
    if isinstance(state, list) and where != common:  # ShardedObject payloads are [data]
        state = state[0]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: the common state is a {type(state).__name__}, not a dict")
    return state
