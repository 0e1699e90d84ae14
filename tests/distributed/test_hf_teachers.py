"""Teachers from Hugging Face and Megatron-LM checkpoints, on gloo ranks (one world-2 launch).

The parent makes a byte-level BPE tokenizer (500 tokens) and six random ``transformers`` models
(Llama with Llama 3 RoPE scaling and tied embeddings, Mistral with a head width unlike
hidden/heads, a sliding window and linear RoPE interpolation, Qwen2 with QKV biases, Qwen3 with
QK norms, Qwen3-MoE with 4 experts, top-2 without renormalisation and a dense layer, Mixtral
with 4 experts, top-2), each embedding 512 rows as Qwen pads its vocabulary, and computes their
logits. The ranks then:

1. import every model with ``import_hf.convert`` and check the round trip through
   ``hf.format.megatron_to_hf`` is bitwise; write Qwen2, Qwen3-MoE and Mixtral exports from
   generated configs (as a trained student has no source config);
2. build each as a teacher inside a student TP group of 2 at teacher TP 1 (student padded
   vocabulary 504) and teacher TP 2 (padded 800): logits equal transformers' on the 500 real
   columns, PAD_LOGIT elsewhere, and the KD loss equals the dense float64 reference over the
   true vocabulary;
3. save the imported Llama in Megatron-LM's layout through ``dist_checkpointing.save`` (TP 2 with
   ``common.pt``; PP 2 x VPP 2 with ``model0``/``model1``, the common state as the DCP object
   ``common_state`` and a ``release`` tracker) and check those teachers give bitwise the logits
   of the imported one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, ROWS, SEQ, BATCH = 500, 512, 24, 3
LAYOUTS = ((1, 4), (2, 200))  # (teacher TP, --make-vocab-size-divisible-by) at student TP 2
BASE = dict(
    vocab_size=ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-5, initializer_range=0.2,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=4, tie_word_embeddings=True,
                                  rope_theta=500000.0, rope_scaling=LLAMA3)),
    "mistral": ("MistralConfig", dict(head_dim=32, sliding_window=256, max_position_embeddings=4096,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}  # fmt: skip
EXPORTS = ("qwen2", "qwen3_moe", "mixtral")
"""Exported from a generated config.json and loaded by transformers (ours: teacher TP 2)."""


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    tokens_bs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    return tokens_bs, torch.arange(SEQ).expand(BATCH, SEQ).contiguous()


def _hf_model(arch: str, out: Path, tok: Path) -> dict[str, torch.Tensor]:
    """Save a random model of ``arch`` with the tokenizer; its logits ``[s, b, ROWS]``.

    Also ``arch + "_bf16"``: the logits with the weights rounded to bfloat16 (what a bf16 import
    holds), computed in float32 as the teacher runs.
    """
    import transformers

    name, extra = ARCHS[arch]
    torch.manual_seed(len(arch))
    config = getattr(transformers, name)(**{**BASE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases (their init is 1 and 0), routers
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            if pname.endswith(".gate.weight"):  # distinct router logits: no top-k ties
                param.copy_(torch.randn_like(param))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, out / f)
    logits = {}
    with torch.no_grad():
        for name in (arch, arch + "_bf16"):
            logits[name] = model.eval()(input_ids=_tokens()[0]).logits.transpose(0, 1).contiguous()
            for param in model.parameters():  # not the buffers: RoPE frequencies stay float32
                param.copy_(param.bfloat16().float())
    return logits


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("transformers")
    from salt_megatron.data.corpus import stdlib_docstrings
    from salt_megatron.data.hf_tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("hf_teachers")
    texts = [d["text"] for _, d in zip(range(300), stdlib_docstrings(), strict=False)]
    tok = train_bpe_tokenizer(texts, root / "tok", VOCAB)
    logits = {k: v for arch in ARCHS for k, v in _hf_model(arch, root / arch, root / "tok").items()}
    return {"root": str(root), "tok": str(root / "tok"), "fp": tok.fingerprint, "logits": logits}


# ---- ranks ---------------------------------------------------------------------------------------
def _import_and_round_trip(spec: dict[str, Any]) -> dict[str, Any]:
    """Import all models (TP = PP = 1, DP = 2); the TP = 1 state dicts map back bitwise."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from safetensors.torch import load_file

    from salt_megatron.checkpoint import layout
    from salt_megatron.checkpoint.untrusted import load_weights
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.hf.exporter import write_hf_folder
    from salt_megatron.hf.format import megatron_to_hf
    from salt_megatron.hf.importer import convert, plan_import
    from salt_megatron.models.gpt import build_gpt
    from salt_megatron.parallel.state import reseed

    mpu.initialize_model_parallel(1, 1)
    reseed(1)
    out: dict[str, Any] = {}
    convert(plan_import(os.path.join(spec["root"], "qwen2"), dtype="bf16"),
            os.path.join(spec["root"], "ck_qwen2_bf16"))  # fmt: skip
    for arch in ARCHS:
        hf_dir, ckpt = os.path.join(spec["root"], arch), os.path.join(spec["root"], f"ck_{arch}")
        plan = plan_import(hf_dir)
        summary = convert(plan, ckpt)
        gpt = build_gpt(plan.model, mcfg.transformer_config(plan.model, tp=1),
                        padded_vocab_size=summary.padded_vocab_size,
                        max_sequence_length=plan.model.max_position_embeddings,
                        pre_process=True, post_process=True)  # fmt: skip
        load_weights(gpt, layout.iteration_dir(ckpt, 0))
        sd = {k: v for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}
        back, original = (
            megatron_to_hf(sd, plan.model, ROWS, plan.source.architecture),
            load_file(f"{hf_dir}/model.safetensors"),
        )
        out[arch] = sorted(back) == sorted(original) and all(
            torch.equal(back[k], original[k]) for k in original
        )
        if arch in EXPORTS and dist.get_rank() == 0:  # a trained student has no source config
            meta = {k: v for k, v in layout.read_meta(layout.iteration_dir(ckpt, 0)).items()
                    if k != "source"}  # fmt: skip
            write_hf_folder(os.path.join(spec["root"], f"export_{arch}"), sd, plan.model, meta,
                            plan.tokenizer)  # fmt: skip
    dist.barrier()
    mpu.destroy_model_parallel()
    return out


def _teacher_logits(spec: dict[str, Any], load: str, t: int, div: int) -> torch.Tensor:
    """This rank's teacher logits ``[s, b, V/2]`` inside a student TP group of 2."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config import parse_config
    from salt_megatron.parallel.state import reseed
    from salt_megatron.teacher import Teacher

    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    reseed(1)
    cfg = parse_config([
        "--mock-data", "--tokenizer-model", spec["tok"], "--seq-length", str(SEQ),
        "--kd-teacher-load", load, "--kd-steps", "1", "--tensor-model-parallel-size", "2",
        "--teacher-tensor-model-parallel-size", str(t), "--make-vocab-size-divisible-by", str(div),
    ])  # fmt: skip
    padded = mcfg.padded_vocab_size(VOCAB, div, 2)
    rank = mpu.get_tensor_model_parallel_rank()
    teacher = Teacher.build(cfg, mpu.get_tensor_model_parallel_group(), rank, 2, True, padded,
                            spec["fp"], device=torch.device("cpu"), vocab_size=VOCAB)  # fmt: skip
    assert teacher is not None
    logits_sbv = teacher.student_layout_logits(*_tokens())
    teacher.release()
    mpu.destroy_model_parallel()
    return logits_sbv


def _check_against_hf(spec: dict[str, Any], arch: str, got_sbv: torch.Tensor, kd: bool) -> float:
    """Max error on the real columns of this rank's slice; PAD_LOGIT beyond; the KD loss."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.loss import kd_cross_entropy, reference_kd_loss
    from salt_megatron.teacher import PAD_LOGIT

    width, rank = got_sbv.shape[-1], int(os.environ["RANK"])
    want_sbv = torch.full((SEQ, BATCH, 2 * width), PAD_LOGIT)
    want_sbv[..., :VOCAB] = spec["logits"][arch][..., :VOCAB]
    lo, hi = rank * width, (rank + 1) * width
    err = (got_sbv - want_sbv[..., lo:hi]).abs().max().item()
    if kd:  # only the tokenizer's vocabulary takes part, whatever the padded sizes
        g = torch.Generator().manual_seed(9)
        student_sbv = torch.randn(SEQ, BATCH, 2 * width, generator=g, dtype=torch.float64) * 2
        labels_sb = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
        mpu.initialize_model_parallel(tensor_model_parallel_size=2)
        mine_sbv = student_sbv[..., lo:hi].float().contiguous()
        group = mpu.get_tensor_model_parallel_group()
        loss_sb = kd_cross_entropy(mine_sbv, got_sbv, labels_sb, 0.7, 1.5, group)
        mpu.destroy_model_parallel()
        dense = reference_kd_loss(student_sbv, want_sbv.double(), labels_sb, 0.7, 1.5)["loss"]
        err = max(err, (loss_sb.double() - dense).abs().max().item())
    return err


def _save_megatron_lm(spec: dict[str, Any], root: str, tp: int, pp: int, vpp: int | None) -> None:
    """The imported Llama, saved as Megatron-LM's ``generate_state_dict`` + ``save`` would."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from salt_megatron.checkpoint import layout, trainer_state
    from salt_megatron.checkpoint.saved import saved_model_config
    from salt_megatron.checkpoint.untrusted import load_weights
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config.schema import DataConfig, ParallelConfig, SaltConfig
    from salt_megatron.models.student import build_student_chunks
    from salt_megatron.parallel.state import init_student_parallel
    from tests.unit.test_teacher_sources import megatron_lm_args

    ckpt = layout.iteration_dir(os.path.join(spec["root"], "ck_llama"), 0)
    model = saved_model_config(layout.read_meta(ckpt), ckpt)
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp)  # fmt: skip
    cfg = SaltConfig(model=model, parallel=par, data=DataConfig(mock_data=True, seq_length=SEQ))
    init_student_parallel(par, 1)
    tf = mcfg.transformer_config(model, tp=tp, pp=pp, vpp=vpp)
    chunks = build_student_chunks(cfg, tf, ROWS)
    for chunk in chunks:
        load_weights(chunk, ckpt)
    release = vpp is not None
    args = megatron_lm_args(spec["tok"], new_names=release, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vpp)  # fmt: skip
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 0 if release else 7}
    dp = {"dp_cp_group": mpu.get_data_parallel_group(with_context_parallel=True)}
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    state: dict[str, Any] = {k: c.sharded_state_dict(metadata=dp) for k, c in zip(keys, chunks)}
    if release:  # newer megatron-core: the common state is one ShardedObject, no common.pt
        rank = dist.get_rank()
        state["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=rank)
    else:
        state |= common
    path = os.path.join(root, "release" if release else "iter_0000007")
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    trainer_state.use_results_queue()
    dist_checkpointing.save(state, path, sharded_strategy=trainer_state._save_strategy())
    if dist.get_rank() == 0:
        if release:
            os.remove(os.path.join(path, "common.pt"))  # holds only {} here
        with open(os.path.join(root, layout.TRACKER_FILE), "w") as f:
            f.write("release" if release else "7")
    dist.barrier()
    mpu.destroy_model_parallel()


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    from salt_megatron.runtime import cpu_compat

    cpu_compat.enable()
    out: dict[str, Any] = {"round_trip": _import_and_round_trip(spec), "errors": {}, "logits": {}}
    for arch in ARCHS:
        for t, div in LAYOUTS:
            got = _teacher_logits(spec, os.path.join(spec["root"], f"ck_{arch}"), t, div)
            out["errors"][arch, t] = _check_against_hf(spec, arch, got, kd=arch == "llama")
            out["logits"][arch, t] = got
    got = _teacher_logits(spec, os.path.join(spec["root"], "ck_qwen2_bf16"), *LAYOUTS[0])
    out["errors"]["qwen2_bf16", 1] = _check_against_hf(spec, "qwen2_bf16", got, kd=False)
    for name, (tp, pp, vpp) in {"mlm_tp2": (2, 1, None), "mlm_vpp": (1, 2, 2)}.items():
        root = os.path.join(spec["root"], name)
        _save_megatron_lm(spec, root, tp, pp, vpp)
        for t, div in LAYOUTS:
            got = _teacher_logits(spec, root, t, div)
            out["errors"][name, t] = torch.equal(got, out["logits"]["llama", t])
    return out


def test_hf_and_megatron_lm_teachers(hf: dict[str, Any]) -> None:
    import transformers

    results = run_distributed(_run, 2, hf)
    print("max |ours - transformers| (or bitwise equal for Megatron-LM):", results[0]["errors"])
    for out in results:
        assert all(out["round_trip"].values()), out["round_trip"]
        for (name, t), err in out["errors"].items():
            if name.startswith("mlm"):
                assert err is True, (name, t)  # bitwise equal to the imported teacher
            else:
                assert err < 1e-4, (name, t, err)
    assert results[0]["errors"]["llama", 2] < 1e-4 and len(results[0]["errors"]) == 17
    root = Path(hf["root"])
    assert (root / "mlm_vpp" / "release" / ".metadata").exists()
    assert not (root / "mlm_vpp" / "release" / "common.pt").exists()
    assert (root / "mlm_tp2" / "iter_0000007" / "common.pt").exists()

    # The generated-config exports in transformers: our teacher's logits (teacher TP 2).
    names = {"qwen2": "Qwen2", "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral"}
    for arch in EXPORTS:
        config = json.loads((root / f"export_{arch}" / "config.json").read_text())
        assert config["architectures"] == [f"{names[arch]}ForCausalLM"], config
        assert config["vocab_size"] == VOCAB
        exported = transformers.AutoModelForCausalLM.from_pretrained(
            root / f"export_{arch}", dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            theirs_sbv = exported(input_ids=_tokens()[0]).logits.transpose(0, 1)
        ours_sbv = torch.cat([r["logits"][arch, 2] for r in results], dim=-1)[..., :VOCAB]
        assert (theirs_sbv - ours_sbv).abs().max().item() < 1e-4, arch
    assert transformers.AutoTokenizer.from_pretrained(root / "export_qwen2").eos_token_id == 0


def test_imported_teacher_refuses_another_tokenizer(hf: dict[str, Any], tmp_path: Path) -> None:
    """Runs after the launch above (same module fixture): its checkpoints exist."""
    from salt_megatron.config import parse_config
    from salt_megatron.data.hf_tokenizer import train_bpe_tokenizer
    from salt_megatron.teacher import TeacherError
    from salt_megatron.teacher.checks import (
        check_compatible,
        resolve_checkpoint,
        teacher_model_config,
    )

    load = os.path.join(hf["root"], "ck_qwen2")
    if not os.path.isdir(load):
        pytest.skip("needs test_hf_and_megatron_lm_teachers' checkpoints")
    other = train_bpe_tokenizer([f"x{i} = {i} ** 2" for i in range(99)], tmp_path / "o", 300)
    flags = ["--kd-teacher-load", load, "--kd-steps", "1", "--seq-length", "32"]
    cfg = parse_config(["--mock-data", "--tokenizer-model", str(tmp_path / "o"), *flags])
    ckpt = resolve_checkpoint(load)
    assert ckpt.meta["source"]["architecture"] == "Qwen2ForCausalLM"
    model = teacher_model_config(ckpt, cfg)
    with pytest.raises(TeacherError, match="must share one tokenizer") as err:
        check_compatible(ckpt, model, cfg, other.fingerprint, other.vocab_size)
    assert hf["fp"] in str(err.value) and other.fingerprint in str(err.value)
    check_compatible(ckpt, model, cfg, hf["fp"], VOCAB)
