"""The offline teacher-target store (write, read, checks) and the top-k / top-p targets (no TP)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from salt_megatron.data.batches import collate
from salt_megatron.data.errors import DataError
from salt_megatron.data.target_codec import float16_up, relative_bound
from salt_megatron.data.teacher_targets import (
    TargetsDataset,
    TargetSpec,
    TargetStore,
    remove_stale_temporaries,
    sample_checksum,
    shard_dir,
    shard_done,
    write_shard,
    write_spec,
)
from salt_megatron.distill.targets import sparse_targets

SEQ, K, VOCAB = 6, 4, 50


class _Samples:
    """A GPT-like dataset: deterministic random tokens per index."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(i + self.seed)
        row = torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ),
                "position_ids": torch.arange(SEQ)}  # fmt: skip


def _spec(**kw: object) -> TargetSpec:
    base = dict(
        teacher="t (step 1)", tokenizer_fingerprint="fp", dataset_fingerprint="d",
        dataset_length=100, num_samples=10, seq_length=SEQ, vocab_size=VOCAB, temperature=2.0,
        top_k=K, top_p=0.9, samples_per_shard=4,
    )  # fmt: skip
    return TargetSpec(**{**base, **kw})  # type: ignore[arg-type]


def teacher_arrays(spec: TargetSpec, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's padded ``[count, seq, k]`` targets of one shard (random logits at the spec's
    T, k, p), as the tool computes them."""
    count = spec.shard_range(shard)[1]
    gen = torch.Generator().manual_seed(shard)
    logits = torch.randn(count * spec.seq_length, spec.vocab_size, generator=gen) * 3
    ids, logq, resid = sparse_targets(logits, spec.temperature, spec.top_k, spec.top_p, None,
                                      spec.vocab_size)  # fmt: skip
    shape = (count, spec.seq_length, spec.top_k)
    return ids.view(shape).numpy(), logq.view(shape).numpy(), resid.view(shape[:2]).numpy()


def write_store(root: Path, spec: TargetSpec, data: _Samples) -> dict[int, tuple]:
    """The teacher's targets of every shard; returns what was written per sample."""
    write_spec(str(root), spec)
    written = {}
    for shard in range(spec.num_shards):
        start, count = spec.shard_range(shard)
        ids, logq, resid = teacher_arrays(spec, shard)
        sums = np.array([sample_checksum(data[start + j]) for j in range(count)], dtype=np.uint64)
        write_shard(str(root), spec, shard, ids, logq, resid, sums)
        for j in range(count):
            written[start + j] = (ids[j], logq[j], resid[j])
    return written


def _sorted(ids_sk: np.ndarray, logq_sk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.where(ids_sk >= 0, ids_sk, 1 << 30), axis=1, kind="stable")
    return np.take_along_axis(ids_sk, order, 1), np.take_along_axis(logq_sk, order, 1)


@pytest.mark.parametrize("fmt", ["q8", "float16", "float32"])
def test_store_round_trip_and_batches(tmp_path: Path, fmt: str) -> None:
    spec, data = _spec(logprob_format=fmt), _Samples(100)
    written = write_store(tmp_path, spec, data)
    assert spec.num_shards == 3 and spec.shard_range(2) == (8, 2)
    shard0 = shard_dir(str(tmp_path), 0)
    if fmt != "q8":  # V = 50, k = 4: the narrowest integer types
        assert np.load(os.path.join(shard0, "ids.npy")).dtype == np.uint16
        assert np.load(os.path.join(shard0, "counts.npy")).dtype == np.uint8
    store = TargetStore(str(tmp_path))
    store.check_run("fp", data, 10, SEQ, VOCAB, 2.0)
    wrapped = TargetsDataset(data, store)
    for i in (0, 5, 9, 3):
        got = wrapped[i]
        ids, logq, resid = written[i]
        assert torch.equal(got["tokens"], data[i]["tokens"])
        assert got["kd_ids"].dtype == torch.int32 and got["kd_logprobs"].dtype == torch.float32
        got_ids, got_logq = got["kd_ids"].numpy(), got["kd_logprobs"].numpy()
        if fmt == "q8":  # the top-1 in slot 0, the other ids in id order; error bound
            assert np.array_equal(got_ids[:, 0], ids[:, 0])
            (ref_ids, ref_logq), (got_ids, got_logq) = (
                _sorted(ids, logq),
                _sorted(got_ids, got_logq),
            )
        else:
            ref_ids, ref_logq = ids, logq
        assert np.array_equal(got_ids, ref_ids)
        kept = ref_ids >= 0
        if fmt == "float32":
            assert np.array_equal(got_logq[kept], ref_logq[kept])
            assert torch.equal(got["kd_residual"], torch.from_numpy(resid))
        elif fmt == "float16":
            assert np.array_equal(got_logq[kept], ref_logq[kept].astype(np.float16))
            assert torch.equal(got["kd_residual"], torch.from_numpy(resid))
        else:
            q_ref, q_got = np.exp(ref_logq.astype(np.float64)), np.exp(got_logq.astype(np.float64))
            r16 = got["kd_residual"].numpy().astype(np.float16)
            assert np.array_equal(r16, resid.astype(np.float16))
            lq = ref_logq.astype(np.float64)
            span = np.where(kept, lq, -np.inf).max(1) - np.where(kept, lq, np.inf).min(1)
            bound_s = relative_bound(float16_up(span), np.where(kept, q_ref, 0).sum(1), r16)
            assert np.all((np.abs(q_got / q_ref - 1) <= bound_s[:, None] + 1e-6)[kept])
    batch = collate([wrapped[1], wrapped[2]])
    assert batch["kd_ids"].shape == (2, SEQ, K) and batch["kd_residual"].shape == (2, SEQ)
    assert "kd_ids" not in collate([data[1]])


def test_store_refuses_what_does_not_belong_to_the_run(tmp_path: Path) -> None:
    spec, data = _spec(), _Samples(100)
    write_store(tmp_path, spec, data)
    store = TargetStore(str(tmp_path))
    with pytest.raises(DataError, match="temperature"):
        store.check_run("fp", data, 10, SEQ, VOCAB, 1.0)
    with pytest.raises(DataError, match=r"made with the teacher t \(step 1\), --kd-teacher-load"):
        store.check_run("fp", data, 10, SEQ, VOCAB, 2.0, teacher="u (step 1)")
    with pytest.raises(DataError, match="tokenizer fingerprint"):
        store.check_run("other", data, 10, SEQ, VOCAB, 2.0)
    with pytest.raises(DataError, match="cover samples"):
        store.check_run("fp", data, 12, SEQ, VOCAB, 2.0)
    with pytest.raises(DataError, match="its tokens differ"):
        TargetsDataset(_Samples(100, seed=1), store)[3]  # another data pipeline, same index
    with pytest.raises(DataError, match="no targets for sample 10"):
        store.sample(10)
    os.rename(shard_dir(str(tmp_path), 1), shard_dir(str(tmp_path), 1) + ".tmp123")
    with pytest.raises(DataError, match="1 of 3 shards are missing, incomplete or corrupt"):
        store.check_run("fp", data, 10, SEQ, VOCAB, 2.0)
    with pytest.raises(DataError, match=r"shard .*shard_000001 is missing; rerun"):
        TargetStore(str(tmp_path)).sample(5)
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["shard_000000", "shard_000002", "targets.json"]
    with pytest.raises(DataError, match="not a teacher-targets directory"):
        TargetStore(str(tmp_path / "nowhere"))


def test_a_grown_store_rewrites_only_its_short_last_shard(tmp_path: Path) -> None:
    spec, data = _spec(), _Samples(100)
    write_store(tmp_path, spec, data)
    grown = replace(spec, num_samples=12)
    assert [shard_done(str(tmp_path), grown, s) for s in range(grown.num_shards)] == [
        True, True, False,  # shard 2 held samples 8-9 and must now hold 8-11
    ]  # fmt: skip
    assert spec.differences(grown) == ["num_samples: 10 != 12"]


@pytest.mark.parametrize("top_p", [None, 0.5])
def test_sparse_targets_are_the_teachers_top_ids(top_p: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 64, generator=gen) * 2
    logits[:, 60:] = -1e30  # padding columns
    logits[0, :] = 0.0  # all tied: lowest ids first
    logits[0, 60:] = -1e30
    ids, logq, resid = sparse_targets(logits, 2.0, 8, top_p, None, vocab_size=60)
    ref = torch.log_softmax(logits.double() / 2.0, dim=-1)
    top = ref.topk(8, dim=-1)
    kept = ids >= 0
    assert torch.equal(ids[0], torch.arange(8) if top_p is None else ids[0])
    assert torch.equal(torch.where(kept, top.indices, -1)[1:], ids[1:])
    torch.testing.assert_close(logq[kept].double(), top.values[kept], rtol=1e-5, atol=1e-5)
    q = torch.where(kept, top.values.exp(), 0.0)
    torch.testing.assert_close(resid.double(), 1.0 - q.sum(-1), rtol=1e-5, atol=1e-5)
    if top_p is None:
        assert kept.all()
    else:  # the smallest prefix whose mass reaches p
        before = q.cumsum(-1) - q
        assert (before[kept] < top_p).all() and (q.sum(-1) >= top_p).logical_or(kept.all(-1)).all()
        assert kept[:, 0].all() and not kept.all()
