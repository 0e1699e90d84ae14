"""Silence megatron-core's import-time warnings about optional packages nobody asked for.

megatron-core warns at import when apex or Transformer Engine is missing and it falls back to
plain PyTorch code; on CPU machines that is every run, several lines per rank. These fallbacks are
not ones the user asked for (asking for ``--transformer-impl transformer_engine`` without TE is
still a hard error, see :mod:`salt_megatron.models.gpt`), so they are filtered here.
"""

from __future__ import annotations

import warnings

_MESSAGES = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce it is recommended",
    r".*is deprecated and will be removed in future versions",
    r"Please use DTensor instead",
)


def silence_known_warnings() -> None:
    """Install the filters (idempotent); call before importing megatron-core."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
