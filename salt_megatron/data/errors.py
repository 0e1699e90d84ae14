"""The data pipeline's error type: every bad-input failure raises :class:`DataError`."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent input data; the message names the offending file (and line)."""
