"""Weights & Biases: the flags, the missing-extra error, and MetricsWriter's scalars in a real
offline run read back from its files (the end-to-end check is in tests/integration)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.training.logger import MetricsWriter
from salt_megatron.training.tracking import require_wandb, start_wandb, wandb_dir
from tests.wandb_files import offline_runs, read_offline_run

BASE = ["--mock-data", "--vocab-size", "256"]


def test_flags_and_default_dir() -> None:
    cfg = parse_config([*BASE, "--wandb-project", "p", "--wandb-exp-name", "e", "--save", "/ck"])
    assert (cfg.logging.wandb_project, cfg.logging.wandb_exp_name) == ("p", "e")
    assert wandb_dir(cfg) == "/ck/wandb"  # Megatron-LM's default: under --save
    cfg = parse_config([*BASE, "--wandb-project", "p", "--wandb-exp-name", "e",
                        "--wandb-save-dir", "/w"])  # fmt: skip
    assert wandb_dir(cfg) == "/w"
    with pytest.raises(ConfigError, match="--wandb-project needs --wandb-exp-name"):
        parse_config([*BASE, "--wandb-project", "p"])


def test_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config([*BASE, "--wandb-project", "p", "--wandb-exp-name", "e"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when absent
    with pytest.raises(ConfigError, match=r"salt-megatron\[wandb\]") as info:
        require_wandb(cfg.logging)
    assert "--wandb-project p needs the wandb package" in str(info.value)
    require_wandb(parse_config(BASE).logging)  # not asked for: no import, no error


def test_writer_logs_scalars_and_config_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = parse_config([*BASE, "--wandb-project", "proj", "--wandb-exp-name", "run-a",
                        "--wandb-save-dir", str(tmp_path), "--kd-steps", "7"])  # fmt: skip
    writer = MetricsWriter(None, True, None, start_wandb(cfg))
    logged = {1: {"loss": 5.25, "kd_loss": 4.5}, 2: {"loss": 5.0, "kd_loss": 4.25}}
    for step, values in logged.items():
        writer.scalars(step, values, prefix="train/")
    writer.scalars(2, {"loss": 6.0}, prefix="valid/")  # same step, other group: one row
    writer.close()

    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert (run.name, run.project) == ("run-a", "proj")
    assert run.config["distill"]["kd_steps"] == 7
    assert run.config["logging"]["wandb_exp_name"] == "run-a"
    assert sorted(run.history) == [1, 2]
    assert run.history[1]["train/kd_loss"] == 4.5 and run.history[2]["train/loss"] == 5.0
    assert run.history[2]["valid/loss"] == 6.0
