"""SFT on real megatron-core: packed logits, the response-only loss, and layouts against TP 1.

One world-1 launch: a tiny GPT is pretrained (plain LM, 8 steps) and saved; an SFT run loads it
(:class:`~salt_megatron.training.sft.SFTRun`, as ``pretrain_salt.py --sft`` does) and, before any
step, every example of a packed sequence (with padding) must give the logits of that example run
alone (no mask, positions from 0) within :data:`LOGITS_TOL`, for RoPE (megatron ignores position
ids there; RoPE is relative, so only the float rounding of the rotations differs) and for learned
absolute positions (the position ids restart per example; other matmul shapes round differently:
1.8e-7 measured); the SFT loss of the sequence must equal a float64 cross-entropy over the
response tokens only, computed from those alone-run logits. The same process checks the refusals:
a bad record without --sft-skip-bad-lines (its file:line), a missing --sft-data, a resume from a
checkpoint that is not an SFT run's, or one made on another SFT set. Then
``run()`` fine-tunes 3 steps: the reference.

One world-2 launch: the same SFT at TP 2, TP 2 with sequence parallelism, PP 2 (1F1B), PP 2 x
VPP 2 (a middle chunk: the mask reaches every stage), DP 2 with the distributed optimizer, all
loading the TP-1 checkpoint: loss and grad norm of each step and the final validation loss within
1e-5 of TP 1. With bf16 (DP 2, distributed optimizer: float32 main weights copied from the loaded
bf16 ones) within 2e-2 (without that copy, step 2 is 0.7 above TP 1: the random initial weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.docstring_data import docstring_texts, train_test_tokenizer
from tests.integration.conftest import read_metrics

pytestmark = pytest.mark.distributed

LOGITS_TOL = {"rope": 1e-5, "learned_absolute": 2e-6}
SHAPE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", "64", "--make-vocab-size-divisible-by", "8",
]  # fmt: skip
SFT = [
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "3e-3",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--sft-valid-fraction", "0.2",
]  # fmt: skip


def make_files(tmp: Path) -> None:
    """A 300-piece sentencepiece tokenizer and 60 prompt/response records from docstrings."""
    texts = docstring_texts(30_000)
    train_test_tokenizer(texts, tmp / "tok")
    with open(tmp / "sft.jsonl", "w") as f:
        for k, text in enumerate(t for t in texts if len(t.split()) > 10):
            words = text.split()
            n = 2 + k % 6
            f.write(
                json.dumps({"prompt": " ".join(words[:3]), "response": " ".join(words[3 : 3 + n])})
                + "\n"
            )
            if k == 59:
                break
    lines = (tmp / "sft.jsonl").read_text().splitlines(keepends=True)
    bad = '{"prompt": "an empty response", "response": ""}\n'
    (tmp / "bad.jsonl").write_text("".join([*lines[:3], bad, *lines[3:6]]))


def _sft_argv(tmp: Path, extra: list[str], metrics: str = "", pretrained: bool = True) -> list[str]:
    argv = ["--sft", "--sft-data", str(tmp / "sft.jsonl"), *SFT, *extra]
    argv += ["--pretrained-checkpoint", str(tmp / "pre")] if pretrained else []
    return argv + (["--metrics-file", str(tmp / metrics)] if metrics else [])


def _parse(argv: list[str]) -> Any:
    import torch.distributed as dist

    from salt_megatron.checkpoint.saved import pretrained_defaults
    from salt_megatron.config import parse_config

    cfg = parse_config(argv, fill=pretrained_defaults)
    cfg.validate_world(dist.get_world_size())
    return cfg


def _checksum(chunks: list[Any]) -> float:
    return sum(float(p.double().sum()) for chunk in chunks for p in chunk.parameters())


def _pretrain(tmp: Path) -> float:
    """8 plain LM steps on the packed SFT set, saved to ``tmp/pre`` (TP 1); the weights' sum."""
    from megatron.core import parallel_state

    from salt_megatron.checkpoint import trainer_state
    from salt_megatron.data.sft import read_examples
    from salt_megatron.data.sft_pack import PackedSFTDataset, fit
    from salt_megatron.data.tokenizer import SentencePieceTokenizer
    from salt_megatron.training.trainer import Trainer

    tok = SentencePieceTokenizer(tmp / "tok.model")
    examples, _ = read_examples(str(tmp / "sft.jsonl"), tok)
    data = PackedSFTDataset(fit(examples, 64)[0], 64, tok.eod, 0, epochs=10)
    cfg = _parse(["--mock-data", "--tokenizer-model", str(tmp / "tok.model"), "--vocab-size",
                  "300", *SHAPE, "--train-iters", "8", "--lr", "1e-2", "--global-batch-size", "8",
                  "--micro-batch-size", "4", "--log-interval", "100"])  # fmt: skip
    trainer = Trainer(cfg, (data, None), tok.vocab_size, tokenizer_fingerprint=tok.fingerprint)
    trainer.train()
    trainer_state.save(trainer, str(tmp / "pre"), 1, tok.fingerprint, {})
    trainer.close()
    parallel_state.destroy_model_parallel()
    return _checksum(trainer.model)


def _packed_vs_alone(tmp: Path, extra: list[str], pretrained: bool) -> dict[str, Any]:
    """Max |logits| difference packed vs alone, and the SFT loss vs float64 CE, on a packed
    sequence of the 3 shortest examples (and padding), before any step."""
    from megatron.core import parallel_state

    from salt_megatron.checkpoint.layout import unwrap
    from salt_megatron.data.batches import collate
    from salt_megatron.models.stage import packed_causal_mask
    from salt_megatron.training.sft import SFTRun
    from salt_megatron.training.step import sft_forward_step
    from salt_megatron.training.trainer import Trainer

    sft = SFTRun(_parse(_sft_argv(tmp, extra, pretrained=pretrained)), 1)
    trainer = Trainer(sft.cfg, (sft.train, sft.valid), 300, padded_vocab=sft.padded_vocab)
    fresh = _checksum(trainer.model)
    sft.start(trainer, None, {})  # the pretrained weights, if any
    members = sorted(sft.train.examples, key=lambda e: e.positions)[:3]
    batch = collate([sft.train.sequence(members)])
    gpt = unwrap(trainer.model[0])
    gpt.eval()
    result: dict[str, Any] = {"members": len(members), "fill": sum(e.positions for e in members),
                              "fresh": fresh, "loaded": _checksum(trainer.model)}  # fmt: skip
    with torch.no_grad():
        packed = gpt(
            batch["tokens"], batch["position_ids"], packed_causal_mask(batch["segment_ids"])
        )
        out, loss_fn = sft_forward_step(iter([batch]), trainer.model[0])
        loss_sum, count, _ = loss_fn(out)
        diffs, ce, tokens, start = [], torch.zeros((), dtype=torch.float64), 0, 0
        for ex in members:
            n = ex.positions
            ids = torch.as_tensor(ex.ids, dtype=torch.long)
            alone = gpt(ids[None, :-1], torch.arange(n)[None], None)[0]  # [n, V], causal
            diffs.append(float((packed[0, start : start + n] - alone).abs().max()))
            logp = torch.log_softmax(alone.double(), dim=-1)[torch.arange(n), ids[1:]]
            keep = torch.as_tensor(ex.target[1:])
            ce -= logp[keep].sum()
            tokens += int(keep.sum())
            start += n
    result |= {"max_diff": max(diffs), "loss_sum": float(loss_sum), "count": int(count),
               "ce64": float(ce), "tokens": tokens}  # fmt: skip
    if pretrained:
        result["refusals"] = _refusals(tmp, sft, trainer)
    trainer.close()
    parallel_state.destroy_model_parallel()
    return result


def _refusals(tmp: Path, sft: Any, trainer: Any) -> list[str]:
    """The errors of a bad record (without --sft-skip-bad-lines), a missing --sft-data, a resume
    from a checkpoint that is not an SFT run's, and of one made on another SFT set."""
    from salt_megatron.training.sft import SFTRun

    errors = []
    changed = {"sft": sft.state()["sft"] | {"sequences": 1}}
    calls = [
        lambda: SFTRun(_parse(_sft_argv(tmp, ["--sft-data", str(tmp / "bad.jsonl")])), 1),
        lambda: SFTRun(_parse(_sft_argv(tmp, ["--sft-data", str(tmp / "absent.jsonl")])), 1),
        lambda: sft.start(trainer, 5, {"phase": "plain"}),
        lambda: sft.start(trainer, 5, changed),
    ]
    for call in calls:
        try:
            call()
            errors.append("no error")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    sft.start(trainer, 5, sft.state())  # its own checkpoint: no error
    return errors


def _mask_and_epochs() -> dict[str, bool]:
    """The packed mask against loops; --sft-epochs' step count against a brute-force search."""
    from salt_megatron.config.schema import TrainingConfig
    from salt_megatron.models.stage import packed_causal_mask
    from salt_megatron.training.batch_schedule import BatchSchedule
    from salt_megatron.training.sft import steps_for_epochs

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    want = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    for b in range(2):
        for i in range(8):
            for j in range(i + 1):
                want[b, 0, i, j] = bool(seg[b, i] != seg[b, j])
    ramp = TrainingConfig(micro_batch_size=1, global_batch_size=8, rampup_batch_size=[2, 2, 20])
    schedule = BatchSchedule(ramp, 1)
    brute = all(
        steps_for_epochs(schedule, e, p)
        == max(k for k in range(e * p + 1) if schedule.samples_before(k) <= e * p)
        for e in (1, 3) for p in (1, 7, 30)
    )  # fmt: skip
    return {"mask": bool((packed_causal_mask(seg) == want).all()), "epochs": brute}


def _train(tmp: Path, layouts: dict[str, list[str]]) -> None:
    """``run()`` each layout (as pretrain_salt.py --sft); metrics to ``tmp/m_<name>.jsonl``."""
    from megatron.core import parallel_state

    from salt_megatron.training.run import run

    for name, extra in layouts.items():
        assert run(_parse(_sft_argv(tmp, extra, metrics=f"m_{name}.jsonl"))) == 0
        parallel_state.destroy_model_parallel()


def _reference(tmp: Path) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    pretrained = _pretrain(tmp)
    learned = [*SHAPE, "--position-embedding-type", "learned_absolute", "--tokenizer-model",
               str(tmp / "tok.model")]  # fmt: skip
    checks = {
        "rope": _packed_vs_alone(tmp, [], pretrained=True),
        "learned_absolute": _packed_vs_alone(tmp, learned, pretrained=False),  # random weights
    }
    _train(tmp, {"tp1": []})
    return checks | _mask_and_epochs() | {"pretrained": pretrained}


def _world2(tmp: Path) -> None:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    _train(tmp, LAYOUTS)


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2_vpp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size",
                 "2"],
    "dp2_distopt": ["--use-distributed-optimizer"],
    "dp2_bf16": ["--use-distributed-optimizer", "--bf16"],
}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sft")
    make_files(tmp)
    return tmp, run_distributed(_reference, 1, tmp)[0]


def test_packed_examples_match_alone_and_loss_is_response_ce(
    reference: tuple[Path, dict[str, Any]],
) -> None:
    tmp, checks = reference
    rope = checks["rope"]  # the pretrained weights were loaded, exactly
    assert rope["loaded"] == checks["pretrained"] != rope["fresh"]
    for kind, tol in LOGITS_TOL.items():
        got = checks[kind]
        assert got["members"] >= 3 and got["fill"] < 64, got  # several examples, and padding
        print(f"{kind}: max |logits packed - alone| {got['max_diff']:.2e} (tolerance {tol})")
        assert got["max_diff"] <= tol, (kind, got["max_diff"])
        assert got["count"] == got["tokens"]
        assert got["loss_sum"] == pytest.approx(got["ce64"], rel=1e-6), kind
    assert checks["mask"] and checks["epochs"]
    bad_record, absent, not_sft, changed = rope["refusals"]
    assert absent == f"DataError: --sft-data {tmp / 'absent.jsonl'}: no such file", absent
    assert bad_record.startswith(f"DataError: {tmp / 'bad.jsonl'}:4: empty response"), bad_record
    assert not_sft.startswith("CheckpointError: --load None holds a checkpoint that is not an SFT")
    assert changed.startswith("DataError: --load None: its SFT set") and "another order" in changed


def _steps(path: Path) -> tuple[list[tuple[float, float]], float]:
    train = read_metrics(path)
    valid = read_metrics(path, group="valid")
    assert sorted(train) == [1, 2, 3] and sorted(valid) == [3]
    return [(train[s]["loss"], train[s]["grad_norm"]) for s in (1, 2, 3)], valid[3]["loss"]


def test_layouts_match_tp1(reference: tuple[Path, dict[str, Any]]) -> None:
    tmp, _ = reference
    ref, ref_val = _steps(tmp / "m_tp1.jsonl")
    run_distributed(_world2, 2, tmp)
    for name in LAYOUTS:
        got, val = _steps(tmp / f"m_{name}.jsonl")
        tol = 2e-2 if "bf16" in name else 1e-5
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), 1):
            assert loss == pytest.approx(ref_loss, abs=tol, rel=tol), (name, step, loss, ref_loss)
            if "bf16" not in name:
                assert norm == pytest.approx(ref_norm, abs=tol, rel=tol), (name, step)
        assert val == pytest.approx(ref_val, abs=tol, rel=tol), (name, val, ref_val)
