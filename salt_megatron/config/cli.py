"""Read the config tree from YAML (``--config``) and Megatron-style flags generated from its fields.

Precedence: dataclass defaults < YAML file < command-line flags. Every error (an unknown flag or
YAML key, a wrong type, an inconsistent value) is one line naming the flag, raised before any
process group starts.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from salt_megatron.config.schema import ConfigError, SaltConfig
from salt_megatron.config.sft import check_given

#: Flag prefix of each section (the teacher reuses the model's fields).
SECTION_PREFIX = {"teacher": "teacher-"}
#: Extra spellings accepted for some flags, as in Megatron-LM and the SALT docs.
ALIASES = {"kd_data_path": ["--kd-data"]}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if is_field and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def sections() -> dict[str, type]:
    """Section name -> dataclass type of the tree's top level."""
    hints = typing.get_type_hints(SaltConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SaltConfig)}


def flag_name(section: str, name: str) -> str:
    """The command-line flag of a field."""
    return "--" + SECTION_PREFIX.get(section, "") + name.replace("_", "-")


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (built by its factory if it has one; None when required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _add_field(group: Any, section: str, name: str, tp: Any, doc: str, default: Any) -> None:
    flags = [flag_name(section, name), *ALIASES.get(name, [])]
    dest = f"{section}.{name}"
    help_text = f"{doc} (default: {default})"
    base = _unwrap_optional(tp)
    common: dict[str, Any] = dict(dest=dest, help=help_text, default=argparse.SUPPRESS)
    if base is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base))
        group.add_argument(*flags, choices=choices, type=type(choices[0]), **common)
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        group.add_argument(*flags, nargs="+", type=item, metavar="X", **common)
    else:
        group.add_argument(*flags, type=base, metavar=base.__name__.upper(), **common)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: ``--config`` plus one flag per config field, grouped by section."""
    parser = _Parser(
        prog="pretrain_salt.py",
        description="SALT pretraining on megatron-core: KD from a small teacher, then plain LM.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with the config tree")
    for section, cls in sections().items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = field_default(f)
            _add_field(group, section, f.name, hints[f.name], docs.get(f.name, ""), default)
    return parser


def _check_type(section: str, name: str, tp: Any, value: Any) -> Any:
    """Validate a YAML value against the field's type; return it (ints widen to floats)."""
    base = _unwrap_optional(tp)
    where = flag_name(section, name)
    if value is None:
        if base is tp:
            raise ConfigError(f"{where} may not be null")
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(base))}")
        return value
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        value = value.split() if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        try:
            return [item(v) for v in value]
        except ValueError:
            raise ConfigError(
                f"{where}: expected a list of {item.__name__}, got {value!r}"
            ) from None
    if (base is int and isinstance(value, bool)) or not isinstance(value, base):
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}")
    return value


def _read_yaml(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    known = sections()
    values: dict[str, dict[str, Any]] = {}
    for section, fields in raw.items():
        if section not in known:
            raise ConfigError(f"--config {path}: unknown section {section!r}")
        if not isinstance(fields, dict):
            raise ConfigError(f"--config {path}: section {section!r} must be a mapping")
        hints = typing.get_type_hints(known[section])
        for name, value in fields.items():
            if name not in hints:
                raise ConfigError(f"--config {path}: unknown key {section}.{name}")
            values.setdefault(section, {})[name] = _check_type(section, name, hints[name], value)
    return values


def from_dict(values: dict[str, dict[str, Any]]) -> SaltConfig:
    """Build and validate the tree from ``{section: {field: value}}``."""
    built = {name: cls(**values.get(name, {})) for name, cls in sections().items()}
    return SaltConfig(**built)


Values = dict[str, dict[str, Any]]
"""``{section: {field: value}}``: the values given (YAML, then flags), before defaults."""


def parse_config(
    argv: list[str] | None = None, fill: Callable[[Values], Values] | None = None
) -> SaltConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a validated :class:`SaltConfig`.

    ``fill`` may add defaults to the values given before the tree is built (it sees only what the
    YAML file and the flags set): e.g. the model shape of ``--pretrained-checkpoint``.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    values = _read_yaml(args.config) if args.config else {}
    for dest, value in vars(args).items():
        if dest == "config":
            continue
        section, name = dest.split(".", 1)
        values.setdefault(section, {})[name] = value
    check_given(values)
    return from_dict(fill(values) if fill is not None else values)


def to_dict(cfg: SaltConfig) -> dict[str, dict[str, Any]]:
    """The tree as plain YAML-able data (the inverse of :func:`from_dict`)."""
    return dataclasses.asdict(cfg)
