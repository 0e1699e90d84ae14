"""The Python-sources corpus (salt_megatron/data/code_corpus.py): each cleaning rule on small
hand-written files whose expected output is written out here, and the deduplication across
files, in path order, for 1 and 2 worker processes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from salt_megatron.data import code_corpus as cc
from salt_megatron.data.demo import code_paragraphs

APACHE = """\
# Copyright 2024 The Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
"""

BODY = '''\
import torch


def rotate_half(x):
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
'''


def _text(cut: cc.Cut) -> str:
    return "".join(unit for unit, _ in cut.units)


def test_licence_header_and_docstring_paragraphs_are_stripped() -> None:
    cut = cc.cut_file("site-packages/pkg/a.py", (APACHE + "\n" + BODY).encode())
    assert cut.reason is None and cut.licence_lines == 5  # 4 comment lines and the blank one
    assert _text(cut) == BODY
    doc = '"""Lexers for Python.\n\n:copyright: 2006 by the team.\n:license: BSD.\n"""\n'
    cut = cc.cut_file("site-packages/pkg/b.py", (doc + BODY).encode())
    assert _text(cut) == '"""Lexers for Python.\n"""\n' + BODY
    only = '"""\nPermission is hereby granted, free of charge.\n"""\n'
    assert _text(cc.cut_file("site-packages/pkg/c.py", (only + BODY).encode())) == BODY
    plain = "# A module comment.\n" + BODY  # kept as it is
    assert _text(cc.cut_file("site-packages/pkg/d.py", plain.encode())) == plain


def test_copied_from_definitions_are_dropped_at_any_depth() -> None:
    source = (
        "class A:\n"
        "    # Copied from transformers.models.llama.modeling_llama.LlamaMLP.forward\n"
        "    def forward(self, x):\n"
        "        return x\n"
        "\n"
        "    def other(self):\n"
        "        return 1\n"
        "\n"
        "\n"
        "@decorate\n"
        "# Copied from transformers.models.bert.modeling_bert.f with Bert->Roberta\n"
        "def f():\n"
        "    pass\n"
    )
    cut = cc.cut_file("site-packages/transformers/models/x/m.py", source.encode())
    assert cut.copied_defs == 2
    # the unit of forward() keeps only a blank line: dropped as empty
    assert _text(cut) == "class A:\n    def other(self):\n        return 1\n\n\n"


def test_generated_unparseable_and_huge_files_are_dropped() -> None:
    table = "T = {\n" + "".join(f"    {i % 7}: Likely.YES,  # 'x'\n" for i in range(3000)) + "}\n"
    assert cc.cut_file("p/t.py", table.encode()).reason == "data-like (compresses below 10%)"
    rng = random.Random(0)
    blob = "B = '" + "".join(rng.choice("abcdefgh0123456789") for _ in range(5000)) + "'\n"
    assert cc.cut_file("p/b.py", (blob + BODY).encode()).reason == "data-like (long lines)"
    assert cc.cut_file("p/s.py", b"print 'python 2'\n" + BODY.encode()).reason is not None
    assert cc.cut_file("p/u.py", b"x = '\xff'\n" + BODY.encode()).reason is not None
    huge = b"x = 1\n" * (cc.MAX_FILE_BYTES // 6 + 1)
    assert cc.cut_file("p/h.py", huge).reason == "over 512 KiB"


def test_units_dedup_across_files_with_the_folder_name_masked(tmp_path: Path) -> None:
    method = (
        "    def forward(self, hidden_states):\n"
        "        # one normalisation step, long enough to be deduplicated\n"
        "        variance = hidden_states.pow(2).mean(-1, keepdim=True)\n"
        "        return self.weight * hidden_states * torch.rsqrt(variance + self.eps)\n"
    )
    files = {
        "site-packages/transformers/models/llama/modeling_llama.py": (
            APACHE + "import torch\n\n\nclass LlamaRMSNorm(nn.Module):\n" + method
        ),
        "site-packages/transformers/models/mistral/modeling_mistral.py": (
            "import torch\n\n\nclass MistralRMSNorm(nn.Module):\n"
            + method
            + "\n    def extra_repr(self):\n        return 'mistral'\n"
            + "\n\ndef sliding_window(config):\n    # Mistral's own function, kept.\n"
            + "    return config.sliding_window or config.max_position_embeddings * 2\n"
        ),
        # another licence, then the same text as the llama file: every long unit seen before
        "site-packages/vendored/copy.py": "# Copyright 2023 Other.\nimport torch\n\n\n"
        "class LlamaRMSNorm(nn.Module):\n" + method,
        "site-packages/pip/_vendor/pkg/mod.py": BODY.replace("torch", "pip._vendor.torch"),
        "site-packages/pkg/mod.py": BODY,
    }
    listed = []
    for doc_id, text in files.items():
        path = tmp_path / doc_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        listed.append((doc_id, path))
    results = []
    for workers in (1, 2):
        stats = cc.CodeCorpusStats()
        docs = list(cc.iter_code_documents(workers, stats, listed))
        results.append(docs)
        by_id = {d["id"]: d["text"] for d in docs}
        assert "def forward" in by_id["site-packages/transformers/models/llama/modeling_llama.py"]
        mistral = by_id["site-packages/transformers/models/mistral/modeling_mistral.py"]
        assert "def forward" not in mistral and "class MistralRMSNorm" in mistral
        assert "def extra_repr" in mistral
        # the copy: its long unit seen before, the rest too short to keep
        assert "site-packages/vendored/copy.py" not in by_id
        assert "def rotate_half" in by_id["site-packages/pip/_vendor/pkg/mod.py"]
        assert "site-packages/pkg/mod.py" not in by_id  # rotate_half: the vendor prefix removed
        assert stats.files == 5 and stats.documents == 3 and stats.duplicate_units == 3
    assert results[0] == results[1]


def test_write_code_corpus_records_a_manifest(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src" / "pkg" / "mod.py"
    src.parent.mkdir(parents=True)
    src.write_text(BODY)
    monkeypatch.setattr(cc, "source_files", lambda: [("site-packages/pkg/mod.py", src)])
    summary = cc.write_code_corpus(tmp_path / "out" / "code.jsonl")
    lines = (tmp_path / "out" / "code.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"id": "site-packages/pkg/mod.py", "text": BODY}]
    manifest = json.loads(Path(summary.manifest).read_text())
    assert manifest["sha256"] == summary.sha256 and manifest["stats"]["documents"] == 1
    assert manifest["cleaning_version"] == cc.CLEANING_VERSION
    assert "numpy" in manifest["packages"]


def test_tokenizer_sample_is_an_even_stride_over_paragraphs(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    docs = ["\n\n".join(f"p{d}-{k}" for k in range(5)) for d in range(4)]  # 20 paragraphs
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert list(code_paragraphs(str(corpus), count=7)) == [
        "p0-0", "p0-3", "p1-1", "p1-4", "p2-2", "p3-0", "p3-3"
    ]  # fmt: skip
    assert len(list(code_paragraphs(str(corpus), count=100))) == 20
