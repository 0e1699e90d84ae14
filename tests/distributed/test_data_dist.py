"""GPTDataset samples on 2 gloo ranks equal the single-rank samples (plain and blended)."""

from __future__ import annotations

from pathlib import Path

import pytest

from salt_megatron.data.preprocess import preprocess_files
from tests.distributed.launcher import run_distributed
from tests.unit.test_data import make_small_data

SAMPLES = 40


def _samples(prefix_a: str, prefix_b: str, model: str, cache: str) -> dict[str, list[list[int]]]:
    """On every rank: first samples of a single-prefix and a weighted-blend train split."""
    import torch.distributed as dist

    from salt_megatron.data.datasets import build_gpt_datasets
    from salt_megatron.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(model)
    out: dict[str, list[list[int]]] = {"world": [[dist.get_world_size()]]}
    for name, blend in (("single", prefix_a), ("blend", f"0.25 {prefix_a} 0.75 {prefix_b}")):
        train, valid, _ = build_gpt_datasets(blend, "95,5,0", 24, 4321, (SAMPLES, 4, 0), tok, cache)
        out[name] = [train[i]["tokens"].tolist() for i in range(SAMPLES)]
        out[name + "_valid"] = [valid[i]["labels"].tolist() for i in range(4)]
    return out


def _single_process(a: str, b: str, model: str, cache: str) -> dict[str, list[list[int]]]:
    """:func:`_samples` in this process, on a one-rank gloo group (blends need a rank)."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        return _samples(a, b, model, cache)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_single_rank(tmp_path: Path) -> None:
    corpus, model = make_small_data(tmp_path, docs=300, vocab=500)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    half = tmp_path / "half.jsonl"
    half.write_text("".join(lines[::2]), encoding="utf-8")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    preprocess_files([corpus], a, str(model), progress=False)
    preprocess_files([half], b, str(model), progress=False)
    two = run_distributed(_samples, 2, a, b, str(model), str(tmp_path / "cache2"))
    one = [_single_process(a, b, str(model), str(tmp_path / "cache1"))]
    assert two[0]["world"] == [[2]] and one[0]["world"] == [[1]]
    for key in ("single", "blend", "single_valid", "blend_valid"):
        assert two[0][key] == two[1][key] == one[0][key], key
    assert two[0]["single"] != two[0]["blend"]
