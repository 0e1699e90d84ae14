"""Run the teacher once over the KD phase's samples and store its sparse soft targets.

    torchrun --nproc_per_node 2 tools/save_teacher_targets.py --out runs/targets/x \
        --top-k 64 [--top-p 0.95] <the student run's pretrain_salt.py flags>

The student run's flags (``--config``, data, ``--seq-length``, ``--seed``, ``--train-iters``,
``--global-batch-size``, ``--rampup-batch-size``, ``--kd-steps``, ``--kd-temperature``,
``--kd-teacher-load``, ``--kd-data-path``) decide the samples: the ones the KD phase's steps
consume (``kd_steps x global_batch_size`` without a ramp-up) of its GPT dataset, keyed by their
dataset index, so any later layout (TP, PP, DP, micro-batch size) replays them with
``pretrain_salt.py --kd-targets DIR``. The pass itself runs
on every rank: data parallel over shards, the teacher's own TP inside
(``--teacher-tensor-model-parallel-size``), ``--micro-batch-size`` sequences per forward.
Rerunning the command after a kill continues with the missing shards; rerunning it with a
larger ``--kd-steps`` adds the samples that are missing.

The log-probabilities are stored as float16 by default (``--logprob-format``; ``float32`` for
the k = V store that replays the online teacher exactly), or as 8-bit codes (``q8``: half the
bytes of float16, a third of format 1's, error bound and measured effect in docs/salt.md). Every
file carries a CRC-32, checked the first time a run reads its shard; check a whole store offline
with

    python tools/save_teacher_targets.py --verify DIR

and rewrite one in another format without the teacher (e.g. a compact ``q8`` copy of a
``float32`` store) with

    python tools/save_teacher_targets.py --convert SRC --out DIR --logprob-format q8
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.data.target_shards import LOGPROB_FORMATS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # -h is handled in main: the other flags are pretrain_salt.py's
        epilog="Every other flag is the student run's: see python pretrain_salt.py --help.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--out", help="the store's directory (required to write one)")
    parser.add_argument("--verify", metavar="DIR",
                        help="check every file and sample of the store DIR and exit")  # fmt: skip
    parser.add_argument("--convert", metavar="SRC",
                        help="rewrite the store SRC into --out in --logprob-format (no teacher, "
                             "one process) and exit")  # fmt: skip
    parser.add_argument("--logprob-format", choices=LOGPROB_FORMATS, default="float16",
                        help="float16 (default) / float32: exact at that precision; q8: 8-bit "
                             "codes, bounded error, half float16's bytes")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=64, help="ids kept per token at most (64)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="keep ids until their mass reaches p (off)")  # fmt: skip
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="samples per atomic shard (default: about 1M tokens, or fewer "
                             "so that every data-parallel rank gets shards)")  # fmt: skip
    return parser


def _command(argv: list[str]) -> str:
    """This command line, as the store records it (what rewrites a missing or corrupt shard)."""
    return shlex.join(["python", str(Path(__file__).resolve()), *argv])


def _parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    args, rest = _parser().parse_known_args(argv)
    if not args.out:
        raise ConfigError("--out DIR is required (or --verify DIR, or --help)")
    args.command = _command(argv)
    cfg = parse_config(rest)  # the student run's config; the pass itself runs the teacher alone
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None
    ))  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    t = cfg.parallel.teacher_tensor_model_parallel_size
    if world % t:
        raise ConfigError(f"world size {world} is not a multiple of the teacher TP size {t}")
    if args.top_k < 1 or (args.top_p is not None and not 0.0 < args.top_p <= 1.0):
        raise ConfigError("need --top-k >= 1 and 0 < --top-p <= 1")
    if not cfg.distill.kd_teacher_load or cfg.distill.kd_steps < 1:
        raise ConfigError("the targets need --kd-teacher-load and --kd-steps >= 1")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise ConfigError("--samples-per-shard must be >= 1")
    return args, cfg


def _verify(root: str) -> int:
    """``--verify DIR``: 0 when every shard is whole, 1 when some are not (listed)."""
    from salt_megatron.data.errors import DataError
    from salt_megatron.data.teacher_targets import verify_store

    try:
        report = verify_store(root)
    except DataError as exc:
        print(f"save_teacher_targets.py: error: {exc}", file=sys.stderr)
        return 5
    spec, tokens = report.spec, max(report.tokens, 1)
    print(
        f"{root}: format {spec.version}, {spec.logprob_format} log-probabilities, "
        f"{spec.num_shards} shards; {report.tokens} tokens verified, "
        f"{report.kept / tokens:.2f} ids and {report.size / tokens:.1f} bytes per token"
    )
    for line in report.problems:
        print(f"save_teacher_targets.py: error: {line}", file=sys.stderr)
    if report.problems:
        print(f"{len(report.problems)} of {spec.num_shards} shards are bad", file=sys.stderr)
        return 1
    crcs = "every file's CRC-32 and " if spec.version == 2 else "(format 1 has no CRC-32s) "
    print(f"{crcs}every sample checked: the store is whole")
    return 0


def _convert(args: argparse.Namespace, argv: list[str]) -> int:
    """``--convert SRC --out DIR``: 0 when DIR holds SRC's targets in the new format."""
    from salt_megatron.data.errors import DataError
    from salt_megatron.data.target_convert import convert_store
    from salt_megatron.distill.targets import store_summary

    if not args.out:
        print("save_teacher_targets.py: error: --convert needs --out DIR", file=sys.stderr)
        return 2
    command = _command(argv)
    start = time.perf_counter()
    try:
        spec = convert_store(args.convert, args.out, args.logprob_format, command)
    except DataError as exc:
        print(f"save_teacher_targets.py: error: {exc}", file=sys.stderr)
        return 5
    summary = store_summary(args.out, spec)
    print(f"{args.convert} -> {args.out}: {summary['tokens']} tokens, "
          f"{summary['bytes_per_token']:.1f} bytes per token ({spec.logprob_format}); "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, _ = _parser().parse_known_args(argv)
    if own.help:
        _parser().print_help()
        return 0
    if own.verify:
        return _verify(own.verify)
    if own.convert:
        return _convert(own, argv)
    try:
        args, cfg = _parse(argv)
    except ConfigError as exc:
        print(f"save_teacher_targets.py: error: {exc}", file=sys.stderr)
        return 2
    from salt_megatron.runtime.quiet import silence_known_warnings

    silence_known_warnings()
    from salt_megatron.data.errors import DataError
    from salt_megatron.runtime import destroy_distributed, init_distributed
    from salt_megatron.teacher import TeacherError

    init_distributed(cfg.parallel.distributed_timeout_minutes)
    try:
        _save(cfg, args)
    except (DataError, TeacherError, ConfigError) as exc:
        print(f"save_teacher_targets.py: error: {exc}", file=sys.stderr)
        return 5
    finally:
        destroy_distributed()
    return 0


def _kd_dataset(cfg: Any, dp: int) -> tuple[Any, Any]:
    """The tokenizer and the KD phase's training dataset, built as pretrain_salt.py builds it."""
    from salt_megatron.training.data import build_run_data

    data = build_run_data(cfg, dp)
    if cfg.distill.kd_data_path:
        return data.tokenizer, build_run_data(cfg, dp, blend=cfg.distill.kd_data_path).train
    return data.tokenizer, data.train


def _spec(cfg: Any, args: argparse.Namespace, tokenizer: Any, dataset: Any, dp: int) -> Any:
    from salt_megatron.data.teacher_targets import TargetSpec
    from salt_megatron.training.batch_schedule import BatchSchedule
    from salt_megatron.training.phase import teacher_record

    num = BatchSchedule(cfg.training, 1).samples_before(cfg.distill.kd_steps)  # any ramp-up
    covered = min(num, len(dataset))
    per_shard = args.samples_per_shard or max(
        1, min((1 << 20) // cfg.data.seq_length, math.ceil(covered / (4 * dp)))
    )
    return TargetSpec(
        teacher=str(teacher_record(cfg.distill.kd_teacher_load)),
        tokenizer_fingerprint=tokenizer.fingerprint or "",
        dataset_fingerprint=str(dataset.unique_description_hash),
        dataset_length=len(dataset),
        num_samples=num,
        seq_length=cfg.data.seq_length,
        vocab_size=int(tokenizer.vocab_size),
        temperature=cfg.distill.kd_temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        samples_per_shard=per_shard,
        logprob_format=args.logprob_format,
        command=args.command,
    )


def _resume_spec(root: str, spec: Any) -> Any:
    """The spec to write: a store already in ``root`` must hold the same targets (it may grow)."""
    from salt_megatron.data.errors import DataError
    from salt_megatron.data.teacher_targets import SPEC_FILE, read_spec

    if not os.path.isfile(os.path.join(root, SPEC_FILE)):
        return spec
    old = read_spec(root)
    diff = old.differences(spec, ignore=("num_samples", "samples_per_shard", "command"))
    if diff:
        raise DataError(f"--out {root} holds targets made with other settings ({'; '.join(diff)})"
                        "; use another --out")  # fmt: skip
    return dataclasses.replace(
        old, num_samples=max(old.num_samples, spec.num_samples), command=spec.command
    )  # shards keep their size, so the complete ones stay valid


def _save(cfg: Any, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.data import teacher_targets as store
    from salt_megatron.distill.targets import save_targets, store_summary
    from salt_megatron.parallel.state import reseed
    from salt_megatron.runtime import device
    from salt_megatron.teacher import Teacher

    t = cfg.parallel.teacher_tensor_model_parallel_size
    mpu.initialize_model_parallel(tensor_model_parallel_size=t)
    reseed(cfg.training.seed)
    tp_group, dp = mpu.get_tensor_model_parallel_group(), mpu.get_data_parallel_world_size()
    tokenizer, dataset = _kd_dataset(cfg, dp)
    spec = _spec(cfg, args, tokenizer, dataset, dp)
    if args.top_k > spec.vocab_size:
        raise ConfigError(f"--top-k {args.top_k} exceeds the vocabulary ({spec.vocab_size})")
    spec = _resume_spec(args.out, spec)
    dist.barrier()  # every rank has read the old spec before rank 0 rewrites it
    if dist.get_rank() == 0:
        store.remove_stale_temporaries(args.out)
        store.write_spec(args.out, spec)
    dist.barrier()
    padded = mcfg.padded_vocab_size(spec.vocab_size, cfg.model.make_vocab_size_divisible_by, t)
    teacher = Teacher.build(
        cfg, tp_group, mpu.get_tensor_model_parallel_rank(), t, True, padded,
        tokenizer.fingerprint, device=device(), vocab_size=spec.vocab_size,
    )  # fmt: skip
    start = time.perf_counter()
    save_targets(
        teacher, dataset, args.out, spec, cfg.training.micro_batch_size,
        mpu.get_data_parallel_rank(), dp, tp_group, mpu.get_tensor_model_parallel_rank() == 0,
    )  # fmt: skip
    if teacher is not None:
        teacher.release()
    if dist.get_rank() == 0:
        summary = store_summary(args.out, spec)
        print(
            f"teacher targets: {spec.covered} samples ({summary['tokens']} tokens) in "
            f"{spec.num_shards} shards -> {args.out}; {summary['mean_ids_per_token']:.2f} ids "
            f"per token (k={spec.top_k}, p={spec.top_p}), {summary['bytes_per_token']:.1f} "
            f"bytes per token ({spec.logprob_format}); this pass "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
