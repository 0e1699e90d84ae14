"""Every YAML in examples/configs parses, validates at its intended world size, and plans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from salt_megatron import planner
from salt_megatron.config import parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
WORLD_COMMENT = re.compile(r"^#\s*world[_ ]size:\s*(\d+)", re.MULTILINE)
#: Configs without a ``# world_size: N`` line: (world size, extra flags they are run with).
NO_COMMENT = {
    "tiny_cpu.yaml": (1, ["--mock-data"]),
    "demo_teacher.yaml": (2, ["--mock-data"]),
    "demo_student.yaml": (2, ["--mock-data"]),
}


def _world_and_flags(path: Path) -> tuple[int, list[str]]:
    match = WORLD_COMMENT.search(path.read_text())
    if match:
        return int(match.group(1)), []
    assert path.name in NO_COMMENT, (
        f"{path.name}: add a '# world_size: N' comment (or an entry in NO_COMMENT of this test)"
    )
    return NO_COMMENT[path.name]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_parses_and_validates(path: Path) -> None:
    world, flags = _world_and_flags(path)
    cfg = parse_config(["--config", str(path), *flags])
    cfg.validate_world(world)
    vocab = cfg.model.vocab_size or 8000
    result = planner.plan(cfg, world, vocab, planner.Hardware())
    assert not any(w.startswith("does not fit") for w in result.warnings), result.warnings


def test_scale_configs_match_the_paper_setting() -> None:
    cfg = parse_config(["--config", str(CONFIGS / "salt_pile_1p5b_2p8b.yaml")])
    shapes = [
        (m.num_layers, m.hidden_size, m.num_attention_heads) for m in (cfg.model, cfg.teacher)
    ]
    assert shapes == [(32, 2560, 32), (24, 2048, 16)]
    assert cfg.data.seq_length == 2048 and cfg.distill.enabled
    assert (cfg.distill.kd_steps, cfg.training.train_iters) == (36000, 208000)
    assert cfg.checkpoint.exit_signal == "SIGUSR1"  # what examples/slurm sends
    assert cfg.data.tokenizer_model and cfg.data.data_path == ["/data/pile/pile_text_document"]


def test_70b_config_has_the_megatron_bridge_layout_and_fits_80gb() -> None:
    path = CONFIGS / "llama3_70b_tp4_pp8.yaml"
    cfg = parse_config(["--config", str(path)])
    par, tr = cfg.parallel, cfg.training
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size) == (4, 8)
    assert par.virtual_pipeline_model_parallel_size == 5 and par.sequence_parallel
    assert par.use_distributed_optimizer and par.overlap_grad_reduce and par.overlap_param_gather
    assert tr.recompute_granularity == "full" and cfg.checkpoint.async_save
    result = planner.plan(cfg, 512, cfg.model.vocab_size or 0, planner.Hardware(80.0))
    assert 69e9 < result.student_params < 72e9 and 7.5e9 < result.teacher_params < 8.5e9
    assert result.dp == 16 and result.n_micro == 32
    assert result.memory_total < 80 * planner.GIB
    assert all(w.startswith("teacher on the last") for w in result.warnings), result.warnings
    alternatives = result.memory_alternatives
    assert alternatives["full (uniform, 1 layer)"] < result.memory_total < alternatives["none"]
