"""Task evaluation of a checkpoint through lm-evaluation-harness (``tools/eval_tasks.py``).

    python tools/eval_tasks.py --load runs/x/ckpt --include-path examples/tasks \\
        --tasks salt_docstrings --num-fewshot 0 --output-path results.json --log-samples
    torchrun --nproc_per_node 2 tools/eval_tasks.py --load runs/x/ckpt --tasks hellaswag \\
        --num-fewshot 10 --tensor-model-parallel-size 2

Every rank runs ``lm_eval.simple_evaluate`` on the ``salt-megatron`` backend
(:mod:`.lm_backend`) with the same arguments; global rank 0 prints the results table and
writes ``--output-path``. Standard task names go to lm-eval as they are (their data is
downloaded, so those runs need the network); ``--include-path`` adds task YAMLs from a folder.
When every asked task is such a local one, ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are
set before lm-eval is imported, so nothing is fetched (``--offline`` forces this), and lm-eval's
own task index is not built.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class TaskError(ValueError):
    """The tasks asked for cannot be run as given; the message names the flag."""


# ---- which tasks are local ---------------------------------------------------------------------
class _TagTolerantLoader(yaml.SafeLoader):
    """A safe YAML loader that reads ``!function`` (and any other tag) as None."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_task_names(include_path: str) -> set[str]:
    """The task, group and tag names the YAML files under ``include_path`` define."""
    names: set[str] = set()
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagTolerantLoader)
        except (OSError, yaml.YAMLError) as exc:
            raise TaskError(f"--include-path: {path}: unreadable task YAML ({exc})") from None
        if not isinstance(config, dict):
            continue
        for key in ("task", "group", "tag"):
            value = config.get(key)
            values = value if isinstance(value, list) else [value]
            names.update(v for v in values if isinstance(v, str))
    return names


def split_tasks(spec: str) -> list[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in spec.split(",") if t.strip()]


# ---- the run -------------------------------------------------------------------------------------
def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``salt-megatron`` backend's constructor arguments from the command line."""
    return {
        "load": args.load,
        "step": args.step,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "micro_batch_size": args.micro_batch_size,
        "max_gen_toks": args.max_gen_toks,
        "max_length": args.max_length,
        "tokenizer_model": args.tokenizer_model,
        "tokenizer_type": args.tokenizer_type,
        "transformer_impl": args.transformer_impl,
    }


def evaluate(args: argparse.Namespace, tasks: list[str]) -> dict[str, Any] | None:
    """Run lm-eval on every rank; its results on LOCAL_RANK 0 ranks, None elsewhere."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import salt_megatron.eval.lm_backend  # noqa: F401  (registers "salt-megatron")

    # lm-eval's own index (~15,000 names) takes seconds to build: skipped when all are local
    manager = TaskManager(include_path=args.include_path, include_defaults=not args.all_local)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {args.include_path}" if args.include_path else ""
        raise TaskError(f"--tasks: unknown task(s) {', '.join(unknown)} (not in lm-eval{where})")
    seed = args.seed
    seeds = {} if seed is None else {
        "random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
        "fewshot_random_seed": seed,
    }  # fmt: skip
    return lm_eval.simple_evaluate(
        model="salt-megatron", model_args=model_args(args), tasks=tasks,
        num_fewshot=args.num_fewshot, limit=args.limit, log_samples=args.log_samples,
        task_manager=manager, bootstrap_iters=args.bootstrap_iters, **seeds,
    )  # fmt: skip


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, metric_stderr: value}}`` from lm-eval's ``results`` (the filter
    suffix ``,none`` dropped; other filters kept as ``metric,filter``)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else key] = value
        out[task] = row
    return out


def write_json(path: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    """``--output-path``: metrics (+ stderr), lm-eval's own records, per-sample outputs."""
    from lm_eval.utils import handle_non_serializable

    kept = ("results", "groups", "n-shot", "n-samples", "higher_is_better", "versions", "config")
    record: dict[str, Any] = {
        "checkpoint": {"load": args.load, "step": args.step},
        "model_args": model_args(args),
        "metrics": summary(results),
    }
    record.update({k: results[k] for k in kept if k in results})
    if args.log_samples:
        record["samples"] = results.get("samples", {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=handle_non_serializable, ensure_ascii=False)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/eval_tasks.py``."""
    p = argparse.ArgumentParser(prog="eval_tasks.py", description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (as written by --save)")
    p.add_argument("--step", type=int, help="evaluate iter_<step> (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task/group names")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--include-path", help="folder of extra task YAMLs (e.g. examples/tasks)")
    p.add_argument("--limit", type=float, help="examples per task (< 1: a fraction); testing only")
    p.add_argument("--output-path", help="write metrics (and --log-samples) to this JSON file")
    p.add_argument("--log-samples", action="store_true", help="keep every example's outputs")
    p.add_argument("--seed", type=int, help="python/numpy/torch/few-shot seeds (lm-eval's)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="0: no stderr")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--max-gen-toks", type=int, default=256, help="default generation budget")
    p.add_argument("--max-length", type=int, help="context window (default: max positions)")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's saved path")
    p.add_argument(
        "--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"),
        help="default: the checkpoint's",
    )  # fmt: skip
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"))
    p.add_argument("--offline", action="store_true", help="set HF_*_OFFLINE even for lm-eval tasks")
    return p


def _prepare(args: argparse.Namespace) -> list[str]:
    """Check the arguments, choose offline mode, quiet ranks other than 0; the task list."""
    tasks = split_tasks(args.tasks)
    if not tasks:
        raise TaskError("--tasks: no task named")
    if args.limit is not None and args.limit <= 0:
        raise TaskError("--limit must be > 0")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.include_path and not os.path.isdir(args.include_path):
        raise TaskError(f"--include-path {args.include_path}: no such folder")
    local = local_task_names(args.include_path) if args.include_path else set()
    args.all_local = all(t in local for t in tasks)
    if args.offline or args.all_local:
        os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return tasks


def main(argv: list[str] | None = None) -> int:
    """Evaluate; rank 0 prints the table and writes ``--output-path``; the exit code."""
    from salt_megatron.runtime.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron-core is imported
    from salt_megatron.checkpoint.layout import CheckpointError
    from salt_megatron.checkpoint.saved import LoadError
    from salt_megatron.config.schema import ConfigError
    from salt_megatron.data.errors import DataError
    from salt_megatron.runtime import destroy_distributed

    args = build_parser().parse_args(argv)
    try:
        tasks = _prepare(args)
        results = evaluate(args, tasks)
    except (LoadError, ConfigError, DataError, CheckpointError, TaskError) as exc:
        print(f"eval_tasks.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if results is not None and int(os.environ.get("RANK", "0")) == 0:
        from lm_eval.utils import make_table

        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        if args.output_path:
            write_json(args.output_path, results, args)
            print(f"wrote {args.output_path}")
    return 0
