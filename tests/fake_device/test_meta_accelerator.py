"""Whole GPU code paths on the meta accelerator (world 2): device placement and host syncs.

One launch of two ranks, "meta posing as CUDA" (:mod:`tests.fake_device.harness`), runs:

* the teacher at (student TP, teacher TP) = (1, 1), (2, 1) with 4 and 1 sequences (idle
  replica), (2, 2): built, loaded and run with every tensor on the device;
* SALT_DS scoring (teacher TP 2) of 12 sequences in 6 micro-batches;
* the trainer: student TP 2 with sequence parallelism, bf16, learned absolute positions and
  LayerNorm (modules megatron leaves on the host), DataLoader workers with pinned memory,
  teacher TP 1 (replicas split the micro-batch, hidden states all-gathered), 2 KD steps (with
  a teacher-label-loss KD gate), the teacher's release, 1 plain step, validation; then
  ``eval.perplexity.loss_sums``;
* the trainer on stored teacher targets (``--kd-targets``, no teacher built): the same student,
  2 KD steps with the sparse loss (and a teacher-confidence KD gate), 1 plain step.
* the trainer at PP 2 (1F1B, bf16, 4 micro-batches): 2 KD steps with the teacher balanced over
  the stages (each computes the hidden states of 2 micro-batches before the schedule and the
  first sends its to the last), the release, 1 plain step.
* packed SFT (``--sft``) at PP 2 (bf16, 4 micro-batches): every stage builds the block-diagonal
  mask from the micro-batch's segment ids; 2 steps and a validation.
* an MoE student at EP 2 (4 experts, top-2, megatron's all-to-all dispatcher, bf16, 2
  micro-batches) with SALT from an MoE teacher (EP 1, all-to-all): 2 KD steps, 1 plain step,
  then the routing metrics' read. The token routing runs as a balanced one
  (:func:`~tests.fake_device.harness.balanced_moe_routing`: meta tensors hold no routing).

Any tensor left on the host fails the run ("Tensor on device cpu is not on the expected device
meta!"). Every host read of a device tensor is recorded with its call site; the KD loss, the
teacher, its exchange and the forward steps must make none.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.fake_device import harness
from tests.fake_device.checkpoints import FINGERPRINT, VOCAB, write_teacher_checkpoint

pytestmark = pytest.mark.fake_device

ARCH = ["--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm"]
MODEL = [
    "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "8",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "64",
]  # fmt: skip
HOT_PATH = (
    "salt_megatron/loss/",
    "salt_megatron/teacher/",
    "salt_megatron/parallel/teacher_exchange.py",
    "salt_megatron/distill/step.py",
    "salt_megatron/distill/offline_step.py",
    "salt_megatron/distill/teacher_pass.py",
    "salt_megatron/parallel/teacher_pipeline.py",
    "salt_megatron/models/stage.py",
)
"""Code that runs once per micro-batch on the device: it must never wait for the device."""
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
       "--moe-token-dispatcher-type", "alltoall", "--moe-aux-loss-coeff", "0.01"]  # fmt: skip
MOE_HOT_PATH = (*HOT_PATH, "salt_megatron/models/moe.py", "salt_megatron/training/moe_metrics.py")
DISPATCHER = "megatron/core/transformer/moe/token_dispatcher.py"


def _cfg(root: str, *extra: str) -> Any:
    from salt_megatron.config import parse_config

    return parse_config([*MODEL, *ARCH, "--kd-teacher-load", root, "--kd-steps", "2", *extra])


def _teacher(root: str, tp: int, t: int) -> Any:
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.parallel.state import reseed
    from salt_megatron.runtime import device
    from salt_megatron.teacher import Teacher

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    reseed(1234)
    cfg = _cfg(root, "--tensor-model-parallel-size", str(tp),
               "--teacher-tensor-model-parallel-size", str(t))  # fmt: skip
    padded = mcfg.padded_vocab_size(VOCAB, 8, tp)
    group, rank = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank()
    teacher = Teacher.build(cfg, group, rank, tp, True, padded, FINGERPRINT, device=device())
    assert teacher is not None and teacher.model is not None
    harness.assert_on_device(teacher.model, "meta")
    return teacher, padded // tp


def _host_batch(batch: int) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.randint(0, VOCAB, (batch, 16)),
        "position_ids": torch.arange(16).expand(batch, 16).contiguous(),
    }


def _check_teachers(root: str) -> list[Any]:
    from megatron.core import parallel_state as mpu

    from salt_megatron.data.batches import to_device
    from salt_megatron.runtime import device

    shapes = []
    for tp, t, batch in ((1, 1, 3), (2, 1, 4), (2, 1, 1), (2, 2, 3)):
        teacher, _ = _teacher(root, tp, t)
        on_device = to_device(_host_batch(batch), device())
        with harness.SYNCS.counting() as syncs:
            logits_sbv = teacher.student_layout_logits(
                on_device["tokens"], on_device["position_ids"]
            )
        assert logits_sbv.device.type == "meta"
        assert not syncs, harness.log_syncs(syncs)
        shapes.append((tp, t, batch, tuple(logits_sbv.shape)))
        teacher.release()
        mpu.destroy_model_parallel()
    return shapes


def _check_scoring(root: str, tmp: str) -> dict[str, Any]:
    from megatron.core import parallel_state as mpu

    from salt_megatron.distill.scoring import ScoreSpec, score_dataset

    teacher, _ = _teacher(root, 2, 2)
    samples = []
    for i in range(12):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, VOCAB, (17,), generator=g)
        samples.append({"tokens": tokens[:-1], "labels": tokens[1:],
                        "loss_mask": torch.ones(16), "position_ids": torch.arange(16)})  # fmt: skip
    spec = ScoreSpec(["mock"], 16, 1234, 4, 12, "none", root)
    with harness.SYNCS.counting() as syncs:
        score_dataset(teacher, samples, f"{tmp}/scores", spec, 2, 0, 1,
                      mpu.get_tensor_model_parallel_group(), save_every=3)  # fmt: skip
    teacher.release()
    mpu.destroy_model_parallel()
    return {"syncs": [(e.kind, e.where) for e in syncs]}


def _check_training(root: str) -> dict[str, Any]:
    from megatron.core import parallel_state as mpu

    from salt_megatron.eval.perplexity import loss_sums
    from salt_megatron.training.data import build_run_data
    from salt_megatron.training.trainer import Trainer

    cfg = _cfg(
        root, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--bf16",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3",
        "--num-workers", "1", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1",
        "--kd-gate", "teacher-label-loss", "--kd-gate-threshold", "4",
    )  # fmt: skip
    data = build_run_data(cfg, 1)
    trainer = Trainer(cfg, (data.train, data.valid), VOCAB, tokenizer_fingerprint=FINGERPRINT)
    for chunk in trainer.model:
        harness.assert_on_device(chunk, "meta")
    loader = trainer.train_iters[0].loader  # type: ignore[union-attr]
    with harness.SYNCS.counting() as setup_syncs:
        trainer.kd.sync(trainer.step)  # builds the teacher (and checks the vocabulary shards)
    harness.PINNED.clear()
    steps = []
    for _ in range(3):
        with harness.SYNCS.counting() as syncs:
            result = trainer.train_step()
        steps.append({"kd": result.kd_phase, "syncs": [(e.kind, e.where) for e in syncs]})
    with harness.SYNCS.counting() as eval_syncs:
        trainer.evaluate(data.valid, 2)
        loss_sums([c.module for c in trainer.model], cfg, data.valid, 4)
    trainer.close()
    mpu.destroy_model_parallel()
    return {
        "setup_syncs": [(e.kind, e.where) for e in setup_syncs],
        "steps": steps,
        "eval_syncs": [(e.kind, e.where) for e in eval_syncs],
        "workers": None if loader is None else loader.num_workers,
        "pinned": len(harness.PINNED),
        "teacher_released": trainer.kd.released_bytes is not None,
    }


def _write_targets(root: str, tmp: str, dataset: Any, n_samples: int) -> str:
    """A store of random top-4 targets for the KD phase's samples (as the tool writes it)."""
    import numpy as np
    import torch.distributed as dist

    from salt_megatron.data import teacher_targets as store
    from salt_megatron.training.phase import teacher_record

    out = f"{tmp}/targets"
    spec = store.TargetSpec(
        teacher=str(teacher_record(root)), tokenizer_fingerprint=FINGERPRINT,
        dataset_fingerprint="", dataset_length=len(dataset), num_samples=n_samples,
        seq_length=16, vocab_size=VOCAB, temperature=1.0, top_k=4, top_p=None,
        samples_per_shard=n_samples,
    )  # fmt: skip
    if dist.get_rank() == 0:
        rng = np.random.default_rng(0)
        ids = np.stack([rng.choice(VOCAB, size=(16, 4), replace=False) for _ in range(n_samples)])
        logq = np.log(np.full((n_samples, 16, 4), 0.2))
        sums = np.array([store.sample_checksum(dataset[i]) for i in range(n_samples)], np.uint64)
        store.write_spec(out, spec)
        store.write_shard(out, spec, 0, ids, logq, np.full((n_samples, 16), 0.2), sums)
    dist.barrier()
    return out


def _check_offline_training(root: str, tmp: str) -> dict[str, Any]:
    from megatron.core import parallel_state as mpu

    from salt_megatron.data.teacher_targets import TargetStore
    from salt_megatron.training.data import build_run_data
    from salt_megatron.training.trainer import Trainer

    mpu.destroy_model_parallel()  # the online trainer's groups

    flags = [
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--bf16",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3",
    ]  # fmt: skip
    cfg = _cfg(root, *flags)
    data = build_run_data(cfg, 1)
    targets = _write_targets(root, tmp, data.train, 8)
    gate = ["--kd-gate", "teacher-confidence", "--kd-gate-threshold", "0.01"]
    cfg = _cfg(root, *flags, *gate, "--kd-targets", targets)
    trainer = Trainer(cfg, (data.train, data.valid), VOCAB, tokenizer_fingerprint=FINGERPRINT,
                      kd_targets=TargetStore(targets))  # fmt: skip
    with harness.SYNCS.counting() as setup_syncs:
        trainer.kd.sync(trainer.step)  # no teacher: the shard-width check only
    steps = []
    for _ in range(3):
        with harness.SYNCS.counting() as syncs:
            result = trainer.train_step()
        steps.append({"kd": result.kd_phase, "syncs": [(e.kind, e.where) for e in syncs]})
    trainer.close()
    mpu.destroy_model_parallel()
    return {"setup_syncs": [(e.kind, e.where) for e in setup_syncs], "steps": steps}


def _check_pipeline(root: str) -> dict[str, Any]:
    """PP 2: 2 KD steps with the teacher pass on both stages, the release, a plain step."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.training.trainer import Trainer

    cfg = _cfg(
        root, "--pipeline-model-parallel-size", "2", "--bf16", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
    )  # fmt: skip
    trainer = Trainer(cfg, (RandomTokens(), None), VOCAB, tokenizer_fingerprint=FINGERPRINT)
    trainer.kd.sync(trainer.step)
    assert trainer.kd.teacher_pass is not None and trainer.kd.step_fn is not None
    harness.assert_on_device(trainer.kd.step_fn.teacher.model, "meta")
    steps = []
    for _ in range(3):
        with harness.SYNCS.counting() as syncs:
            result = trainer.train_step()
        steps.append({"kd": result.kd_phase, "syncs": [(e.kind, e.where) for e in syncs]})
    released = trainer.kd.released_bytes
    trainer.close()
    mpu.destroy_model_parallel()
    return {"steps": steps, "teacher_released": released is not None}


def _check_sft() -> dict[str, Any]:
    """PP 2 packed SFT: 2 steps and a validation over packed random examples."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import parse_config
    from salt_megatron.data.sft import encode_record
    from salt_megatron.data.sft_pack import PackedSFTDataset
    from salt_megatron.data.tokenizer import NullTokenizer
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([
        *MODEL[1:], *ARCH, "--sft", "--sft-data", "unread.jsonl", "--pipeline-model-parallel-size",
        "2", "--bf16", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2",
    ])  # fmt: skip
    tok, g = NullTokenizer(VOCAB), torch.Generator().manual_seed(0)

    def ids(n: int) -> str:
        return " ".join(str(int(i)) for i in torch.randint(0, VOCAB - 1, (n,), generator=g))

    records = [{"prompt": ids(2 + k % 3), "response": ids(1 + k % 4)} for k in range(24)]
    data = PackedSFTDataset([encode_record(r, tok) for r in records], 16, tok.eod, 0, epochs=4)
    trainer = Trainer(cfg, (data, data), VOCAB, tokenizer_fingerprint=FINGERPRINT)
    steps = []
    for _ in range(2):
        with harness.SYNCS.counting() as syncs:
            trainer.train_step()
        steps.append([(e.kind, e.where) for e in syncs])
    with harness.SYNCS.counting() as syncs:
        trainer.evaluate(data, 4)
    trainer.close()
    mpu.destroy_model_parallel()
    return {"steps": steps, "eval_syncs": [(e.kind, e.where) for e in syncs]}


def _check_moe(moe_root: str) -> dict[str, Any]:
    """EP 2 MoE student from an MoE teacher: 2 KD steps, 1 plain step, the metrics' read."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    harness.balanced_moe_routing(topk=2, num_experts=4)
    cfg = parse_config([
        *MODEL, *ARCH, *MOE, "--kd-teacher-load", moe_root, "--kd-steps", "2",
        "--expert-model-parallel-size", "2", "--bf16", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", "3",
    ])  # fmt: skip
    trainer = Trainer(cfg, (RandomTokens(), None), VOCAB, tokenizer_fingerprint=FINGERPRINT)
    for chunk in trainer.model:
        harness.assert_on_device(chunk, "meta")
    trainer.kd.sync(trainer.step)
    assert trainer.kd.step_fn is not None
    harness.assert_on_device(trainer.kd.step_fn.teacher.model, "meta")
    steps = []
    for _ in range(3):
        with harness.SYNCS.counting() as syncs:
            result = trainer.train_step()
        steps.append({"kd": result.kd_phase, "syncs": [(e.kind, e.where) for e in syncs]})
    assert trainer.moe is not None
    with harness.SYNCS.counting() as metric_syncs:
        trainer.moe.collect()
    out = {"steps": steps, "n_micro": trainer.num_microbatches,
           "metric_syncs": [(e.kind, e.where) for e in metric_syncs]}  # fmt: skip
    trainer.close()
    mpu.destroy_model_parallel()
    return out


class RandomTokens:
    """16-token samples of random ids (host tensors, as a dataset yields them)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        row = torch.randint(0, VOCAB, (17,), generator=g)
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(16),
                "position_ids": torch.arange(16)}  # fmt: skip


def _meta_world(root: str, tmp: str, moe_root: str) -> dict[str, Any]:
    harness.stub_checkpoint_load()
    return {
        "teachers": _check_teachers(root),
        "scoring": _check_scoring(root, tmp),
        "training": _check_training(root),
        "offline": _check_offline_training(root, tmp),
        "pipeline": _check_pipeline(root),
        "sft": _check_sft(),
        "moe": _check_moe(moe_root),
    }


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("meta")
    root = write_teacher_checkpoint(str(tmp / "teacher"), *ARCH)
    moe_root = write_teacher_checkpoint(str(tmp / "moe_teacher"), *ARCH, *MOE)
    setup = partial(harness.init_process, "meta")
    ranks = run_distributed(_meta_world, 2, root, str(tmp), moe_root, setup=setup)
    # rank 0's view of every check; at PP 2 the head and the loss run on the last stage, rank 1
    return {**ranks[0], **{key: [rank[key] for rank in ranks] for key in ("pipeline", "sft")}}


def _hot(syncs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [s for s in syncs if any(part in s[1] for part in HOT_PATH)]


def test_teacher_logits_on_the_device(meta_run: dict[str, Any]) -> None:
    assert meta_run["teachers"] == [
        (1, 1, 3, (16, 3, 200)), (2, 1, 4, (16, 4, 104)),
        (2, 1, 1, (16, 1, 104)), (2, 2, 3, (16, 3, 104)),
    ]  # fmt: skip


def test_scoring_reads_the_device_once_per_save(meta_run: dict[str, Any]) -> None:
    """6 micro-batches saved every 3: two copies to the host, not one per micro-batch."""
    syncs = meta_run["scoring"]["syncs"]
    assert [kind for kind, _ in syncs] == ["cpu", "cpu"], syncs
    assert all("distill/scoring.py" in where for _, where in syncs), syncs


def test_kd_step_is_host_sync_free_per_micro_batch(meta_run: dict[str, Any]) -> None:
    steps = meta_run["training"]["steps"]
    assert [s["kd"] for s in steps] == [True, True, False]
    assert meta_run["training"]["teacher_released"]
    setup = meta_run["training"]["setup_syncs"]
    assert [kind for kind, _ in setup] == ["tolist"], setup  # the shard-width check, once
    for step in steps:
        assert not _hot(step["syncs"]), step["syncs"]
        # Left: one read per *step* (4 micro-batches each here), none per micro-batch: the
        # trainer's loss sums, and megatron's token count and gradient norm.
        ours = [s for s in step["syncs"] if "/salt_megatron/" in s[1]]
        assert len(step["syncs"]) == 3 and len(ours) == 1, step["syncs"]


def test_kd_step_on_stored_targets_is_host_sync_free(meta_run: dict[str, Any]) -> None:
    steps = meta_run["offline"]["steps"]
    assert [s["kd"] for s in steps] == [True, True, False]
    assert [kind for kind, _ in meta_run["offline"]["setup_syncs"]] == ["tolist"]
    for step in steps:
        assert not _hot(step["syncs"]), step["syncs"]
        ours = [s for s in step["syncs"] if "/salt_megatron/" in s[1]]
        assert len(step["syncs"]) == 3 and len(ours) == 1, step["syncs"]


@pytest.mark.parametrize("stage", [0, 1], ids=["first_stage", "last_stage"])
def test_pipelined_kd_step_is_host_sync_free(meta_run: dict[str, Any], stage: int) -> None:
    """PP 2, each stage: the teacher pass, its point-to-point sends, and on the last stage the
    teacher's head and the KD loss make no host read."""
    steps = meta_run["pipeline"][stage]["steps"]
    assert [s["kd"] for s in steps] == [True, True, False]
    assert meta_run["pipeline"][stage]["teacher_released"]
    for step in steps:
        assert not _hot(step["syncs"]), step["syncs"]
        ours = [s for s in step["syncs"] if "/salt_megatron/" in s[1]]
        assert len(ours) == 1, step["syncs"]  # the trainer's loss sums, once per step
        # megatron's pipeline p2p never waits for the device (batch_p2p_sync off): what is left
        # is its token count and gradient norm, per step, as without a pipeline.
        assert not [s for s in step["syncs"] if s[0] == "torch.cuda.synchronize"], step["syncs"]
        assert len(step["syncs"]) <= 3, step["syncs"]
    assert sorted(steps[0]["syncs"]) == sorted(steps[2]["syncs"])


def test_evaluation_reads_the_device_only_at_the_end(meta_run: dict[str, Any]) -> None:
    syncs = meta_run["training"]["eval_syncs"]
    assert not _hot(syncs), syncs
    assert len(syncs) <= 4, syncs  # trainer.evaluate and loss_sums: their final totals


def test_batches_come_from_pinned_worker_processes(meta_run: dict[str, Any]) -> None:
    assert meta_run["training"]["workers"] == 1
    assert meta_run["training"]["pinned"] > 0


@pytest.mark.parametrize("stage", [0, 1], ids=["first_stage", "last_stage"])
def test_packed_sft_step_is_host_sync_free(meta_run: dict[str, Any], stage: int) -> None:
    """PP 2 SFT, each stage: the packed mask and the forward step make no host read; left per
    step are the trainer's loss sums (ours, once) and megatron's token count and grad norm."""
    sft = meta_run["sft"][stage]
    for syncs in sft["steps"]:
        assert not _hot(syncs), syncs
        ours = [s for s in syncs if "/salt_megatron/" in s[1]]
        assert len(ours) == 1 and len(syncs) <= 3, syncs
    assert not _hot(sft["eval_syncs"]) and len(sft["eval_syncs"]) <= 2, sft["eval_syncs"]


def test_moe_kd_step_host_syncs(meta_run: dict[str, Any]) -> None:
    """Ours: none per micro-batch (the router hooks count on the device). megatron's all-to-all
    dispatcher waits once per MoE layer and micro-batch, in the forward only, for the split
    sizes it copied to the host (``d2h_event.synchronize()`` before the EP all-to-all; at EP 1
    before sorting the tokens by local expert); its router makes none. Per step here: 2 student
    MoE layers x 2 micro-batches, plus 2 teacher MoE layers x 2 in a KD step; then the
    per-step reads: the trainer's loss sums, megatron's token count, and the gradient norm of
    each of the two chained optimizers (dense and expert parameters). The routing metrics read
    the device once per log window (placeholder values here: meta tensors hold none)."""
    moe = meta_run["moe"]
    assert moe["n_micro"] == 2
    assert [s["kd"] for s in moe["steps"]] == [True, True, False]
    for step in moe["steps"]:
        syncs = step["syncs"]
        hot = [s for s in syncs if any(part in s[1] for part in MOE_HOT_PATH)]
        assert not hot, syncs
        dispatcher = [s for s in syncs if DISPATCHER in s[1]]
        assert {kind for kind, _ in dispatcher} == {"Event.synchronize"}, syncs
        assert len(dispatcher) == (2 + 2 if step["kd"] else 2) * moe["n_micro"], syncs
        norms = [s for s in syncs if s[1].endswith("optimizer/clip_grads.py:133")]
        assert len(norms) == 2 and len(syncs) - len(dispatcher) == 4, syncs
    assert [kind for kind, _ in moe["metric_syncs"]] == ["tolist"], moe["metric_syncs"]
