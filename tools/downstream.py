"""The paper's downstream protocol at small scale, over the demo's baseline and SALT students.

1. **Tasks** made on the machine (``salt_megatron/data/sft_tasks.py``): arithmetic word problems
   and reading comprehension, each a training set for SFT, a held-out validation set and a test
   set, written with an lm-eval task YAML (generate_until, exact match) under ``<out>/tasks``.
2. **Few-shot** scores of each pretrained student on the shipped local tasks
   (``examples/tasks``, group ``salt_docstrings``) through ``tools/eval_tasks.py``.
3. **SFT** of each student on each task with every seed (``pretrain_salt.py --sft``).
4. **Accuracy after SFT**: exact match on the test set, per example, through
   ``tools/eval_tasks.py --log-samples``; bootstrap 95% intervals over examples (seeds pooled)
   and a paired interval of each SALT student's difference from the baseline
   (``salt_megatron/eval/intervals.py``); a table (``<out>/downstream.md``) and a plot.

    python tools/demo.py                 # the students (runs/demo/full/<run>/ckpt)
    python tools/downstream.py           # about an hour on 2 idle cores
    python tools/downstream.py --quick   # a few minutes on tools/demo.py --quick's students

Every finished run leaves its output (an SFT checkpoint, an evaluation JSON), so a killed
protocol continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.downstream_report import report  # noqa: E402
from tools.runs import torchrun  # noqa: E402

STUDENTS = {"baseline": "baseline", "salt": "SALT (online teacher)",
            "salt_offline": "SALT (stored targets)"}  # fmt: skip
"""Demo run folder -> the name the tables use."""


@dataclass(frozen=True)
class Scale:
    """Sizes of one protocol: examples per task and the SFT schedule."""

    train: int
    valid: int
    test: int
    epochs: int
    fewshot_limit: float | None


FULL = Scale(train=4000, valid=200, test=500, epochs=3, fewshot_limit=None)
QUICK = Scale(train=240, valid=24, test=40, epochs=1, fewshot_limit=8)
SFT_FLAGS = ["--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "5e-4",
             "--min-lr", "5e-5", "--lr-warmup-iters", "10", "--log-interval", "10"]  # fmt: skip
TASKS = {"arith": "salt_arith", "reading": "salt_reading"}
"""Task folder -> its lm-eval task name."""

YAML = """# {what} Made by tools/downstream.py; data: {task}.jsonl (split test).
task: {name}
custom_dataset: !function salt_tasks.load_jsonl
dataset_kwargs:
  data_file: {task}.jsonl
output_type: generate_until
test_split: test
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "{pattern}"
        group_select: {group}
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
YAML_ARGS = {
    "arith": dict(what="Arithmetic word problems: exact match of the last number generated.",
                  max_gen=24, pattern="(-?[0-9]+)", group=-1),
    "reading": dict(what="Reading comprehension: exact match of the first word generated.",
                    max_gen=8, pattern="^\\\\s*([A-Za-z]+)", group=0),
}  # fmt: skip


def _fits(tokenizer: Any, seq_length: int) -> Any:
    """Whether an example's prompt + response + eod fits ``seq_length`` positions (n ids take
    n - 1 positions), the SFT packer's rule; the test prompts must fit unchanged too."""

    def fits(ex: dict[str, str]) -> bool:
        n = len(tokenizer.tokenize(ex["prompt"])) + len(tokenizer.tokenize(ex["response"])) + 1
        return n - 1 <= seq_length

    return fits


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_tasks(out: Path, tokenizer: Any, seq_length: int, scale: Scale, seed: int) -> dict:
    """Write both tasks under ``out`` (train/valid JSONL for SFT; ``<task>.jsonl`` + YAML for
    lm-eval); return their sizes and how many generated examples did not fit."""
    from salt_megatron.data import sft_tasks

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "tasks" / "salt_tasks.py", out / "salt_tasks.py")
    fits = _fits(tokenizer, seq_length)
    n = scale.train + scale.valid + scale.test
    made = {
        "arith": (sft_tasks.arithmetic_problems(n, seed), "prompt"),
        "reading": (sft_tasks.reading_problems(sft_tasks.package_passages(), 3, seed), "passage"),
    }
    sizes: dict[str, dict[str, int]] = {}
    for task, (examples, key) in made.items():
        kept = [ex for ex in examples if fits(ex)]
        rest, test = sft_tasks.split_examples(kept, scale.test, seed, key=key)
        train, valid = sft_tasks.split_examples(rest, scale.valid, seed + 1, key=key)
        train = train[: scale.train]
        sft = lambda rows: [{"prompt": r["prompt"], "response": r["response"]} for r in rows]  # noqa: E731
        _write_jsonl(out / f"{task}_train.jsonl", sft(train))
        _write_jsonl(out / f"{task}_valid.jsonl", sft(valid))
        _write_jsonl(out / f"{task}.jsonl", [{**r, "split": "test"} for r in test])
        (out / f"{TASKS[task]}.yaml").write_text(
            YAML.format(name=TASKS[task], task=task, **YAML_ARGS[task])
        )
        sizes[task] = {"generated": len(examples), "too_long": len(examples) - len(kept),
                       "train": len(train), "valid": len(valid), "test": len(test)}  # fmt: skip
    return sizes


def evaluate(ckpt: Path, tasks: str, include: Path, result: Path, extra: list[str],
             nproc: int) -> dict[str, Any]:  # fmt: skip
    """``tools/eval_tasks.py`` on ``ckpt`` (TP = ``nproc``), its JSON (reused when present)."""
    if not result.exists():
        result.parent.mkdir(parents=True, exist_ok=True)
        tmp = result.with_suffix(".tmp.json")
        args = ["--load", str(ckpt), "--tasks", tasks, "--include-path", str(include),
                "--output-path", str(tmp), "--log-samples", "--bootstrap-iters", "0",
                "--tensor-model-parallel-size", str(nproc), "--micro-batch-size", "16",
                *extra]  # fmt: skip
        torchrun(args, nproc, result.with_suffix(".log"), script="tools/eval_tasks.py", echo=False)
        tmp.rename(result)
    return json.loads(result.read_text())


def fine_tune(student: Path, task: str, tasks_dir: Path, seed: int, run: Path, scale: Scale,
              nproc: int) -> Path:  # fmt: skip
    """SFT of ``student`` on ``task`` with ``seed`` into ``run`` (skipped when done)."""
    ckpt = run / "ckpt"
    if (run / "done").exists():
        return ckpt
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    args = ["--sft", "--sft-data", str(tasks_dir / f"{task}_train.jsonl"),
            "--sft-valid-data", str(tasks_dir / f"{task}_valid.jsonl"),
            "--pretrained-checkpoint", str(student), "--sft-epochs", str(scale.epochs),
            "--seed", str(seed), "--eval-interval", "50", *SFT_FLAGS,
            "--tensor-model-parallel-size", str(nproc), "--save", str(ckpt),
            "--metrics-file", str(run / "metrics.jsonl"),
            "--tensorboard-dir", str(run / "tb")]  # fmt: skip
    print(f"== SFT {run.parent.name}/{run.name}", flush=True)
    torchrun(args, nproc, run / "log.txt", echo=False)
    (run / "done").touch()
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="tools/demo.py's output (default: "
                        "runs/demo/full, or runs/demo/quick with --quick)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: runs/downstream/{full,quick}")
    parser.add_argument("--students", nargs="+", default=["baseline", "salt"],
                        choices=list(STUDENTS))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="SFT seeds")
    parser.add_argument("--task-seed", type=int, default=1234, help="seed of the generated tasks")
    parser.add_argument("--nproc", type=int, default=2, help="processes (tensor parallel) per run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (integration test)")
    parser.add_argument("--train", type=int, help="SFT examples per task (default: the scale's)")
    parser.add_argument("--test", type=int, help="test examples per task (default: the scale's)")
    args = parser.parse_args()
    kind = "quick" if args.quick else "full"
    demo = args.demo or ROOT / "runs" / "demo" / kind
    out = args.out or ROOT / "runs" / "downstream" / kind
    scale = QUICK if args.quick else FULL
    scale = dataclasses.replace(scale, train=args.train or scale.train,
                                test=args.test or scale.test)  # fmt: skip
    students = {name: demo / name / "ckpt" for name in args.students}
    missing = [str(p) for p in students.values() if not p.is_dir()]
    if missing:
        demo_cmd = "python tools/demo.py" + (" --quick" if args.quick else "")
        raise SystemExit(f"downstream.py: no student checkpoint {', '.join(missing)}: run "
                         f"`{demo_cmd}` first")  # fmt: skip
    from salt_megatron.checkpoint.saved import check_tokenizer, resolve

    first = resolve(str(next(iter(students.values()))))
    tokenizer = check_tokenizer(first.meta, first.path, None)
    seq_length = int(first.meta["config"]["data"]["seq_length"])
    tasks_dir = out / "tasks"
    print(f"== tasks -> {tasks_dir}", flush=True)
    sizes = make_tasks(tasks_dir, tokenizer, seq_length, scale, args.task_seed)
    limit = [] if scale.fewshot_limit is None else ["--limit", str(scale.fewshot_limit)]
    fewshot = {}
    for name, ckpt in students.items():
        print(f"== few-shot: {name}", flush=True)
        fewshot[name] = evaluate(ckpt, "salt_docstrings", ROOT / "examples" / "tasks",
                                 out / "fewshot" / f"{name}.json",
                                 ["--num-fewshot", "1", *limit], args.nproc)  # fmt: skip
    after: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task, task_name in TASKS.items():
        for name, ckpt in students.items():
            for seed in args.seeds:
                run = out / "sft" / task / f"{name}-s{seed}"
                tuned = fine_tune(ckpt, task, tasks_dir, seed, run, scale, args.nproc)
                result = evaluate(tuned, task_name, tasks_dir, run / "eval.json", [], args.nproc)
                after.setdefault(task, {}).setdefault(name, []).append(result)
    text = report(out, sizes, fewshot, after, {k: STUDENTS[k] for k in students}, args.seeds)
    print("\n" + text)


if __name__ == "__main__":
    main()
