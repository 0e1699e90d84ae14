"""What every config section shares: the error type and the checks that name a flag."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the offending flag."""


def flag(name: str, prefix: str = "") -> str:
    """The flag of field ``name`` (``num_layers`` -> ``--num-layers``; ``prefix="teacher-"``)."""
    return "--" + prefix + name.replace("_", "-")


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def check_positive(obj: object, prefix: str, *names: str) -> None:
    """Check that each field ``names`` of ``obj`` is None or positive."""
    for name in names:
        value = getattr(obj, name)
        check(value is None or value > 0, f"{flag(name, prefix)} must be positive, got {value}")
