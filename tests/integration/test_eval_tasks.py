"""lm-eval backend ``salt-megatron`` against lm-eval's ``hf`` backend on the exported model.

One launch of 2 processes saves a tiny GQA model (randomised norms; 400 tokens in 512 rows, so
TP rank 1 holds 112 padded columns) as our checkpoint at TP=2, then answers the same requests
through the backend at TP=2, PP=2 and TP=1 x DP=2 (each replica a TP=1 model).
``tools/export_hf.py`` exports it (padded rows dropped); lm-eval's ``hf`` backend
(``transformers`` under it: its forward, greedy ``generate`` and stopping criteria) answers the
same requests on the export: per-request log-likelihoods and rolling log-likelihoods must agree
within 1e-4, greedy flags and generations exactly. ``tools/eval_tasks.py`` then runs the shipped
local tasks end to end, offline, and must report what lm-eval's ``hf`` backend reports.

The tokenizer (sentencepiece, no byte fallback) is trained on every text the requests use, so
the export's ``transformers`` tokenizer and ours encode and decode them alike (they differ on
unknown characters and on text that starts with whitespace; docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.docstring_data import docstring_texts, train_test_tokenizer
from tests.integration.tiny_gpt import export_hf, save_tiny_gpt

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "examples" / "tasks"
VOCAB = 400
LAYOUTS = ((2, 1), (1, 2), (1, 1))  # (TP, PP) in a world of 2: the rest is DP
TOL = 1e-4


def _tokenizer(tmp: Path) -> str:
    shipped = [line for f in sorted(TASKS.glob("*.jsonl")) for line in f.open(encoding="utf-8")]
    tasks = [json.dumps(json.loads(s), ensure_ascii=False) for s in shipped]
    texts = docstring_texts(60_000) + tasks
    return train_test_tokenizer(texts, tmp / "tok", VOCAB)


def _requests() -> dict[str, list[tuple[Any, ...]]]:
    """Requests from the tokenizer's text; none starts with whitespace."""
    docs = [t for t in docstring_texts(60_000)[-60:] if not t[0].isspace()]
    words = [d.split(" ") for d in docs]
    ll: list[tuple[Any, ...]] = [(" ".join(w[:6]), " " + " ".join(w[6:9])) for w in words[:10]]
    ll.append((" ".join(words[10][:5]) + " ", " ".join(words[10][5:7])))  # trailing space
    ll.append((docs[11][:400], " " + words[11][-1]))  # longer than the window: cut on the left
    ll.append(("", docs[12][:40]))  # empty context: the prefix token
    rolling = [(docs[13][:60],), (docs[14][:300],), (docs[15][:900],), (docs[16],)]
    stops: tuple[list[str], ...] = (["\n"], ["."], [], ["\n\n", " the"])
    gen = [
        (" ".join(w[:8]), {"until": stops[k % 4], "max_gen_toks": 6 + k, "do_sample": False})
        for k, w in enumerate(words[20:27])
    ]
    gen.append((docs[27][:500], {"until": ["\n"], "max_gen_toks": 9}))  # cut on the left
    return {"loglikelihood": ll, "loglikelihood_rolling": rolling, "generate_until": gen}


def _answers(lm: Any, requests: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[Any]]:
    """Each request kind through ``lm``, plus token-level ``_loglikelihood_tokens`` ones."""
    from lm_eval.api.instance import Instance

    out = {
        kind: getattr(lm, kind)([Instance(kind, {}, args, i) for i, args in enumerate(reqs)])  # type: ignore[arg-type]
        for kind, reqs in requests.items()
        if kind != "tokens"
    }
    out["tokens"] = lm._loglikelihood_tokens(requests["tokens"])
    return out


def _save(root: str, tokenizer_model: str) -> None:
    """The tiny model at TP=2 (world 2), its norms randomised, saved as our checkpoint."""
    save_tiny_gpt(root, tokenizer_model, VOCAB, 0.5, None)


def _save_and_evaluate(root: str, tokenizer_model: str, requests: dict[str, Any]) -> Any:
    """:func:`_save`, then the backend's answers at every layout of :data:`LAYOUTS`.

    Token-level requests: three contexts, each with its greedy next token (found at the first
    layout: ``is_greedy`` must be True) and another token (False).
    """
    from megatron.core import parallel_state as mpu

    from salt_megatron.eval.lm_backend import SaltMegatronLM

    _save(root, tokenizer_model)
    results: dict[Any, Any] = {}
    for tp, pp in LAYOUTS:
        lm = SaltMegatronLM(
            load=root, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            micro_batch_size=3,
        )  # fmt: skip
        if "tokens" not in requests:
            contexts = [lm.tok_encode(ctx) for ctx, _ in requests["loglikelihood"][:3]]
            requests["tokens"] = []
            for ctx in contexts:
                last = torch.tensor([len(ctx) - 1])
                best = int(lm.model.next_ids(torch.tensor([ctx]), last)[0])
                requests["tokens"] += [(None, ctx, [best]), (None, ctx, [(best + 1) % VOCAB])]
        results[(tp, pp)] = _answers(lm, requests)
        mpu.destroy_model_parallel()
    return results, requests["tokens"]


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our answers per layout, the ``hf`` backend's on the export, and where things are."""
    pytest.importorskip("lm_eval", reason="needs the [eval] extra (make venv installs it)")
    from lm_eval.models.huggingface import HFLM

    tmp = tmp_path_factory.mktemp("evaltasks")
    tok = _tokenizer(tmp)
    requests = _requests()
    root = str(tmp / "ckpt")
    ours, requests["tokens"] = run_distributed(_save_and_evaluate, 2, root, tok, requests)[0]
    export_hf(root, tmp / "hf")
    hf = HFLM(pretrained=str(tmp / "hf"), device="cpu", dtype="float32", batch_size=4)
    return {
        "ours": ours, "hf": _answers(hf, requests), "hf_lm": hf, "requests": requests,
        "root": root, "tok": tok, "tmp": tmp,
    }  # fmt: skip


def _max_diff(ours: list[float], ref: list[float]) -> float:
    assert len(ours) == len(ref)
    return max(abs(a - b) for a, b in zip(ours, ref))


def test_backend_matches_hf_backend_on_export(crosscheck: dict[str, Any]) -> None:
    from salt_megatron.data.tokenizer import SentencePieceTokenizer

    ref, requests = crosscheck["hf"], crosscheck["requests"]
    sp = SentencePieceTokenizer(crosscheck["tok"])
    hf_tok = crosscheck["hf_lm"].tokenizer
    encoded = [ctx.rstrip() or cont for ctx, cont in requests["loglikelihood"]]  # _encode_pair
    encoded += [ctx + cont for ctx, cont in requests["loglikelihood"]]
    encoded += [
        args[0] for k in ("loglikelihood_rolling", "generate_until") for args in requests[k]
    ]
    assert [hf_tok.encode(s) for s in encoded] == [sp.tokenize(s) for s in encoded]  # the premise
    assert all(math.isfinite(lp) and lp < 0 for lp, _ in ref["loglikelihood"])
    assert sum(text != "" for text in ref["generate_until"]) >= 4
    assert [g for _, g in ref["tokens"]] == [True, False] * 3
    for layout, got in crosscheck["ours"].items():
        diffs = {}
        for kind in ("loglikelihood", "tokens"):
            diffs[kind] = _max_diff([lp for lp, _ in got[kind]], [lp for lp, _ in ref[kind]])
            assert [g for _, g in got[kind]] == [g for _, g in ref[kind]], (layout, kind)
        roll = got["loglikelihood_rolling"]
        diffs["rolling"] = _max_diff(roll, ref["loglikelihood_rolling"])
        print(
            f"(TP, PP) = {layout}: max |ours - hf| "
            + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
        )
        assert all(d < TOL for d in diffs.values()), (layout, diffs)
        assert got["generate_until"] == ref["generate_until"], layout


def test_eval_tasks_tool_offline_matches_hf_backend(crosscheck: dict[str, Any]) -> None:
    """tools/eval_tasks.py on the shipped local tasks (one process, offline) vs lm-eval's hf."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = crosscheck["tmp"] / "tasks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    args = ["--load", crosscheck["root"], "--include-path", str(TASKS), "--tasks",
            "salt_docstrings", "--limit", "6", "--num-fewshot", "1", "--output-path", str(out),
            "--log-samples", "--bootstrap-iters", "0"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/eval_tasks.py"), *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "salt_docstring_cloze_gen" in proc.stdout and "exact_match" in proc.stdout
    record = json.loads(out.read_text())
    metrics = record["metrics"]
    assert set(metrics) >= {"salt_docstring_next", "salt_docstring_cloze", "salt_docstring_ppl"}
    samples = record["samples"]["salt_docstring_next"]
    assert len(samples) == 6
    assert metrics["salt_docstring_next"]["acc"] == sum(s["acc"] for s in samples) / 6
    hf = lm_eval.simple_evaluate(
        model=crosscheck["hf_lm"], tasks=["salt_docstrings"], limit=6, num_fewshot=1,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        bootstrap_iters=0,
    )  # fmt: skip
    assert hf is not None
    for task, theirs in hf["results"].items():
        for key, value in theirs.items():
            if key.endswith(",none") or key.endswith(",first_word"):
                mine = record["results"][task][key]
                if isinstance(value, float):
                    value = pytest.approx(value, rel=1e-5, abs=1e-6)
                assert mine == value, (task, key)


def test_eval_tasks_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from salt_megatron.eval.tasks import OFFLINE_VARS, main

    pytest.importorskip("lm_eval", reason="needs the [eval] extra (make venv installs it)")
    for var in OFFLINE_VARS:  # recorded, so what main sets is undone afterwards
        monkeypatch.setenv(var, "")
    args = ["--include-path", str(TASKS), "--tasks", "salt_docstring_next"]
    assert main(["--load", str(tmp_path / "none"), *args]) == 2
    assert capsys.readouterr().err.strip() == (
        f"eval_tasks.py: error: --load {tmp_path / 'none'}: no such directory"
    )
    assert main(["--load", str(tmp_path), "--tasks", " , ", "--include-path", str(TASKS)]) == 2
    assert "--tasks: no task named" in capsys.readouterr().err
