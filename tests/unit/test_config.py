"""Config tree: YAML + flags, types, validation errors that name the flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from salt_megatron.config import ConfigError, SaltConfig, build_parser, parse_config, to_dict
from salt_megatron.config import megatron as mcfg
from salt_megatron.config.cli import field_docs, flag_name, from_dict, sections

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_flags_and_yaml_precedence(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(
        "model: {num_layers: 8, hidden_size: 128}\noptim: {lr: 1}\ndata: {mock_data: true}\n"
    )
    cfg = parse_config(
        ["--config", str(yml), "--num-layers", "6", "--tensor-model-parallel-size", "2"]
    )
    assert cfg.model.num_layers == 6  # flag beats YAML
    assert cfg.model.hidden_size == 128  # YAML beats default
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.training.micro_batch_size == 4  # default


def test_megatron_style_flags() -> None:
    argv = [
            "--mock-data", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--micro-batch-size", "4",
            "--global-batch-size", "32", "--seq-length", "256", "--lr", "3e-4", "--no-swiglu",
            "--teacher-num-layers", "2", "--kd-steps", "10", "--kd-schedule", "linear_ratio",
            "--kd-data", "1", "a", "2", "b",
    ]  # fmt: skip
    cfg = parse_config(argv)
    assert (cfg.training.micro_batch_size, cfg.training.global_batch_size) == (4, 32)
    assert cfg.data.seq_length == 256 and cfg.optim.lr == 3e-4 and not cfg.model.swiglu
    assert cfg.teacher.num_layers == 2 and cfg.model.num_layers == 4
    assert cfg.distill.kd_schedule == "linear_ratio" and cfg.distill.kd_data_path == [
        "1",
        "a",
        "2",
        "b",
    ]


def test_round_trip_through_dict() -> None:
    cfg = parse_config(["--mock-data", "--hidden-size", "512", "--num-attention-heads", "8"])
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--bogus-flag", "1"], "--bogus-flag"),
        (["--lr", "fast"], "--lr"),
        (["--num-layers", "2.5"], "--num-layers"),
        (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "--num-layers"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size"),
        (["--kd-weight", "1.5"], "--kd-weight"),
        (["--kd-schedule", "cosine"], "--kd-schedule"),
        (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size"),
        (["--teacher-tensor-model-parallel-size", "2"], "--teacher-tensor-model-parallel-size"),
        (
            ["--teacher-hidden-size", "100", "--teacher-num-attention-heads", "3"],
            "--teacher-hidden-size",
        ),
        (["--split", "1,2"], "--split"),
        (["--sequence-parallel"], "--sequence-parallel"),
        (["--seq-length", "8192"], "--seq-length"),
    ],
)
def test_errors_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["--mock-data", *argv])
    message = str(info.value)
    assert flag in message and "\n" not in message


def test_data_is_required() -> None:
    with pytest.raises(ConfigError, match="--data-path"):
        parse_config([])


def test_world_size_checks() -> None:
    argv = "--mock-data --tensor-model-parallel-size 2 --global-batch-size 8 --micro-batch-size 4"
    cfg = parse_config(argv.split())
    cfg.validate_world(4)  # DP=2: 8 = 4 x 2
    with pytest.raises(ConfigError, match="--global-batch-size 8 is not divisible"):
        cfg.validate_world(8)  # DP=4
    with pytest.raises(ConfigError, match="world size 3"):
        cfg.validate_world(3)


@pytest.mark.parametrize(
    "text, key",
    [("modle: {num_layers: 2}", "modle"), ("model: {layers: 2}", "model.layers"),
     ("model: {num_layers: two}", "--num-layers"), ("optim: {lr: null}", "--lr")],
)  # fmt: skip
def test_yaml_errors(tmp_path: Path, text: str, key: str) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(["--config", str(yml), "--mock-data"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])


def test_every_field_has_a_docstring_and_a_flag() -> None:
    help_text = build_parser().format_help()
    for section, cls in sections().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert flag_name(section, f.name) in help_text


def test_cli_error_is_one_line_before_any_process_group() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_salt.py"), "--mock-data", "--num-layers", "3",
         "--pipeline-model-parallel-size", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["pretrain_salt.py: error: --num-layers 3 is not divisible by the 2 pipeline "
                     "stages (--pipeline-model-parallel-size x virtual size)"]  # fmt: skip


def test_megatron_adapter() -> None:
    cfg = parse_config(["--mock-data", "--tensor-model-parallel-size", "2", "--hidden-size", "96",
                        "--num-attention-heads", "4", "--swiglu"])  # fmt: skip
    tf = mcfg.student_transformer_config(cfg)
    assert tf.tensor_model_parallel_size == 2 and tf.gated_linear_unit
    assert tf.ffn_hidden_size == 256  # 8/3 * 96 = 256, a multiple of 64
    assert tf.calculate_per_token_loss
    assert mcfg.padded_vocab_size(50257, 128, 2) == 50432
    assert mcfg.padded_vocab_size(256, 128, 1) == 256
    opt = mcfg.optimizer_config(cfg)
    assert opt.lr == cfg.optim.lr and opt.clip_grad == cfg.optim.clip_grad


def test_default_tree_is_valid() -> None:
    assert isinstance(SaltConfig(data=sections()["data"](mock_data=True)), SaltConfig)


MOE_FLAGS = ["--mock-data", "--num-experts", "4", "--moe-router-topk", "2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mock-data", "--expert-model-parallel-size", "2"], "need an MoE student"),
        ([*MOE_FLAGS, "--num-experts", "6", "--expert-model-parallel-size", "4"],
         "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
        ([*MOE_FLAGS, "--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
        ([*MOE_FLAGS, "--moe-layer-freq", "1", "0"], "--moe-layer-freq [1, 0]: give one number"),
        ([*MOE_FLAGS, "--moe-router-topk", "5"], "--moe-router-topk 5 exceeds --num-experts 4"),
        ([*MOE_FLAGS, "--moe-router-topk", "1"], "needs --moe-router-pre-softmax"),
        (["--mock-data", "--moe-ffn-hidden-size", "8"], "--moe-ffn-hidden-size need --num-experts"),
        (["--mock-data", "--teacher-moe-ffn-hidden-size", "8"],
         "--teacher-moe-ffn-hidden-size need --teacher-num-experts"),
        ([*MOE_FLAGS, "--moe-grouped-gemm"], "--moe-grouped-gemm needs --transformer-impl"),
        ([*MOE_FLAGS, "--add-bias-linear", "--moe-shared-expert-intermediate-size", "8"],
         "does not support --add-bias-linear"),
    ],
)  # fmt: skip
def test_moe_errors_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value)


def test_moe_layer_pattern_and_expert_layout() -> None:
    cfg = parse_config([*MOE_FLAGS, "--num-layers", "4", "--moe-layer-freq", "2",
                        "--teacher-num-experts", "8", "--expert-model-parallel-size", "2",
                        "--tensor-model-parallel-size", "2", "--sequence-parallel"])  # fmt: skip
    assert cfg.model.moe_layer_pattern() == [1, 0, 1, 0] and cfg.model.is_moe
    assert cfg.teacher.num_experts == 8 and cfg.teacher.is_moe
    assert cfg.parallel.expert_tp == 2 and cfg.parallel.expert_model_parallel_ranks == 4
    cfg.validate_world(4)
    with pytest.raises(ConfigError, match="not divisible by expert TP x"):
        parse_config([*MOE_FLAGS, "--expert-model-parallel-size", "4"]).validate_world(2)
    dense = parse_config(["--mock-data", "--moe-layer-freq", "1", "0", "1"])
    assert not dense.model.is_moe and dense.model.moe_layer_pattern() == [0, 0, 0, 0]
    tf = mcfg.transformer_config(cfg.model, tp=2, sequence_parallel=True, ep=2)
    assert (tf.num_moe_experts, tf.moe_layer_freq, tf.expert_model_parallel_size) == (4, 2, 2)
    assert tf.moe_ffn_hidden_size == mcfg.ffn_hidden_size(cfg.model)
