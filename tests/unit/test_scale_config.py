"""Flags of the scale features: one-line errors, the adapter into megatron-core's configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.config import megatron as mcfg

FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recompute-granularity", "full"], "--recompute-method and --recompute-num-layers"),
        (["--recompute-method", "block"], "need --recompute-granularity full"),
        ([*FULL, "--recompute-num-layers", "3"], "--recompute-num-layers 3 must be at most"),
        (["--recompute-modules", "mlp"], "needs --recompute-granularity selective"),
        (["--recompute-granularity", "selective", "--recompute-modules", "moe"], "choose from"),
        (["--recompute-granularity", "selective", "--recompute-modules", "layernorm"],
         "--transformer-impl transformer_engine"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-grad-reduce"),
        (["--align-param-gather"], "needs --overlap-param-gather"),
        (["--grad-reduce-in-bf16"], "needs --bf16"),
        (["--ddp-bucket-size", "0"], "--ddp-bucket-size must be positive"),
        (["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
        (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "200"], "--lr-wsd-decay-iters 200"),
        (["--rampup-batch-size", "4", "4"], "takes start increment samples"),
        (["--rampup-batch-size", "8", "4", "100"], "0 < start < --global-batch-size 8"),
        (["--rampup-batch-size", "2", "4", "100"], "not a multiple of the increment 4"),
        (["--rampup-batch-size", "x", "4", "100"], "--rampup-batch-size"),
        (["--profile-step-start", "5", "--profile-step-end", "5"], "--profile-step-start 5"),
    ],
)  # fmt: skip
def test_errors_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["--mock-data", *argv])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_rampup_sizes_checked_at_the_world_size() -> None:
    cfg = parse_config(["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "16",
                        "--rampup-batch-size", "4", "6", "100"])  # fmt: skip
    assert cfg.training.ramp_batch_sizes() == [4, 10, 16]
    cfg.validate_world(1)
    with pytest.raises(ConfigError, match="ramp-up batch size 10 is not divisible"):
        cfg.validate_world(2)
    vpp = parse_config(["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "8",
                        "--rampup-batch-size", "2", "2", "10", "--pipeline-model-parallel-size",
                        "4", "--virtual-pipeline-model-parallel-size", "1"])  # fmt: skip
    with pytest.raises(ConfigError, match="ramp-up batch size 2: the interleaved schedule"):
        vpp.validate_world(4)


def test_yaml_lists_of_ints(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("training: {rampup_batch_size: [2, 2, 64]}\nlogging: {profile_ranks: 0 3}\n")
    cfg = parse_config(["--config", str(yml), "--mock-data"])
    assert cfg.training.rampup_batch_size == [2, 2, 64]
    assert cfg.logging.profile_ranks == [0, 3]
    yml.write_text("training: {rampup_batch_size: [2, two, 64]}\n")
    with pytest.raises(ConfigError, match="--rampup-batch-size: expected a list of int"):
        parse_config(["--config", str(yml), "--mock-data"])


def test_adapter_passes_recompute_and_overlap_to_megatron() -> None:
    cfg = parse_config(
        ["--mock-data", "--num-layers", "8", "--pipeline-model-parallel-size", "2", *FULL,
         "--recompute-num-layers", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
         "--overlap-param-gather", "--align-param-gather", "--ddp-bucket-size", "1000000",
         "--bf16", "--grad-reduce-in-bf16"]
    )  # fmt: skip
    tf = mcfg.student_transformer_config(cfg)
    assert (tf.recompute_granularity, tf.recompute_method, tf.recompute_num_layers) == (
        "full",
        "uniform",
        2,
    )
    ddp = mcfg.ddp_config(cfg)
    assert ddp.overlap_param_gather and ddp.align_param_gather and ddp.overlap_grad_reduce
    assert ddp.bucket_size == 1_000_000 and not ddp.grad_reduce_in_fp32
    assert mcfg.optimizer_config(cfg).overlap_param_gather
    teacher = mcfg.teacher_transformer_config(cfg, cfg.teacher)
    assert teacher.recompute_granularity is None  # forward-only: nothing to recompute

    selective = parse_config(["--mock-data", "--recompute-granularity", "selective",
                              "--recompute-modules", "core_attn", "mlp"])  # fmt: skip
    tf = mcfg.student_transformer_config(selective)
    assert tf.recompute_granularity == "selective" and tf.recompute_modules == ["core_attn", "mlp"]
    plain = mcfg.ddp_config(parse_config(["--mock-data"]))
    assert plain.grad_reduce_in_fp32 and plain.bucket_size is None
    assert not plain.overlap_param_gather
