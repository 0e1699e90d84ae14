"""Shared by the benchmark scripts: the machine, its load, a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """Host name, CPU model, core count, OS (and the GPU when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    system = f"{platform.system()} {platform.release()}"
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores, {system}{gpu})"


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine may be shared)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def write_docs(text: str, heading: str) -> None:
    """Replace (or append) only the ``heading`` section of docs/benchmarks.md."""
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n" + text.strip() + "\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old)
    else:
        new = old.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
