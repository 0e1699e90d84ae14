"""Task evaluation's pieces in one process: vocab-parallel reductions, local task files.

The reductions at TP > 1 run in ``tests/integration/test_eval_tasks.py`` (TP=2 against
lm-eval's ``hf`` backend); here, on one rank, against a dense float64 log-softmax and argmax.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from salt_megatron.eval.vocab_parallel import greedy_ids, target_logprobs

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "examples" / "tasks"


def test_padded_columns_excluded_from_softmax_and_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    true_vocab, padded = 37, 48
    logits_nv = torch.randn(6, padded, generator=gen) * 3
    logits_nv[:, true_vocab:] = 50.0  # padding would win everything if it were not excluded
    targets_n = torch.randint(0, true_vocab, (6,), generator=gen)
    dense = torch.log_softmax(logits_nv[:, :true_vocab].double(), dim=-1)
    expected_n = dense.gather(-1, targets_n[:, None]).squeeze(-1)
    got_n = target_logprobs(logits_nv, targets_n, 0, true_vocab)
    assert torch.allclose(got_n.double(), expected_n, atol=1e-5)
    assert torch.equal(greedy_ids(logits_nv, 0, true_vocab), dense.argmax(dim=-1))
    # a slice whose first column is global 16 (as TP rank 1 of 3 would hold): same rows
    assert torch.equal(greedy_ids(logits_nv[:, 16:32], 16, 20), logits_nv[:, 16:20].argmax(-1) + 16)


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits_nv = torch.zeros(2, 8)
    logits_nv[0, [2, 5]] = 1.0
    logits_nv[1, [7, 3]] = 4.0
    assert greedy_ids(logits_nv, 0, 8).tolist() == [2, 3]


def test_local_task_names_and_offline_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from salt_megatron.eval import tasks

    names = tasks.local_task_names(str(TASKS))
    assert names == {
        "salt_docstrings", "salt_docstring_next", "salt_docstring_cloze",
        "salt_docstring_cloze_gen", "salt_docstring_ppl",
    }  # fmt: skip
    for var in tasks.OFFLINE_VARS:  # recorded, so the values set below are undone afterwards
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    args = tasks.build_parser().parse_args(
        ["--load", "x", "--tasks", "salt_docstring_next, hellaswag", "--include-path", str(TASKS)]
    )
    assert tasks._prepare(args) == ["salt_docstring_next", "hellaswag"]
    assert all(var not in tasks.os.environ for var in tasks.OFFLINE_VARS)  # hellaswag downloads
    assert not args.all_local
    args.tasks = "salt_docstrings"
    tasks._prepare(args)
    assert all(tasks.os.environ[var] == "1" for var in tasks.OFFLINE_VARS) and args.all_local
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "exact_match,first_word": 0.25}}}  # fmt: skip
    assert tasks.summary(results) == {
        "t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match,first_word": 0.25}
    }


def test_shipped_task_files_are_reproducible(tmp_path: Path) -> None:
    """tools/make_eval_tasks.py rewrites the committed JSONL files byte for byte."""
    from salt_megatron.eval.task_data import write_task_data

    made_with = json.loads((TASKS / "docstring_text.jsonl").open().readline())["python"]
    if made_with != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the files were made from Python {made_with}'s standard library")
    written = write_task_data(tmp_path)
    assert [w.test for w in written] == [300, 300, 129]
    for w in written:
        assert Path(w.path).read_bytes() == (TASKS / Path(w.path).name).read_bytes(), w.path
    rows = [json.loads(s) for s in (TASKS / "docstring_next.jsonl").open()]
    assert all(r["choices"][r["label"]] == r["answer"] and len(r["choices"]) == 4 for r in rows)
