"""docs/flags.md is what tools/gen_flag_docs.py generates from the config dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from salt_megatron.config.cli import flag_name, sections

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "gen_flag_docs", ROOT / "tools" / "gen_flag_docs.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_md_is_up_to_date() -> None:
    expected = _tool().render()
    current = (ROOT / "docs" / "flags.md").read_text()
    assert current == expected, "docs/flags.md is stale: run python tools/gen_flag_docs.py"


def test_every_flag_is_documented_once() -> None:
    text = _tool().render()
    for section, cls in sections().items():
        assert f"## `{section}`" in text
        for f in dataclasses.fields(cls):
            assert text.count(f"| `{flag_name(section, f.name)}`") == 1, f.name


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    tool = _tool()
    stale = tmp_path / "flags.md"
    stale.write_text("old\n")
    assert tool.main(["--check", "--output", str(stale)]) == 1
    assert tool.main(["--output", str(stale)]) == 0
    assert tool.main(["--check", "--output", str(stale)]) == 0
