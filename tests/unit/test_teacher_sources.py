"""Teachers from elsewhere, without processes: Hugging Face config mapping, Megatron-LM args,
the RoPE variants against transformers, and reading untrusted checkpoints safely."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from salt_megatron.checkpoint import layout, megatron_lm
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.untrusted import (
    COMMON_STATE_KEY,
    dcp_metadata,
    load_weights,
    read_common_state,
)
from salt_megatron.config import parse_config
from salt_megatron.hf.format import (
    HFFormatError,
    architecture_for,
    merge_qkv,
    model_config_from_hf,
    split_qkv,
)
from salt_megatron.teacher import TeacherError
from salt_megatron.teacher.checks import (
    check_compatible,
    check_vocab_rows,
    resolve_checkpoint,
    teacher_model_config,
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "dtype": "bfloat16",
    "rope_parameters": LLAMA3_ROPE,
}  # fmt: skip


def megatron_lm_args(tokenizer_model: str, new_names: bool = True, **over: Any) -> Any:
    """Megatron-LM's saved args for a Llama-3-shaped model (as its arguments.py spells them)."""
    from megatron.core.transformer.enums import AttnBackend

    args: dict[str, Any] = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16,
        max_position_embeddings=128, seq_length=64, position_embedding_type="rope",
        rotary_base=500000, rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None, use_rope_scaling=True, rope_scaling_factor=8.0,
        normalization="RMSNorm", swiglu=True, squared_relu=False,
        untie_embeddings_and_output_weights=False, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=False, num_experts=None, multi_latent_attention=False,
        make_vocab_size_divisible_by=128, padded_vocab_size=512,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model, bf16=False,
        fp16=False, params_dtype=torch.float32, attention_backend=AttnBackend.auto,
        transformer_impl="transformer_engine", ckpt_format="torch_dist", init_method_std=0.02,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
    )  # fmt: skip
    if new_names:  # megatron-core >= 0.14 generates these from TransformerConfig's fields
        args |= {"layernorm_epsilon": 1e-5, "layernorm_zero_centered_gamma": False,
                 "softmax_type": "vanilla"}  # fmt: skip
    else:
        args |= {"norm_epsilon": 1e-5, "apply_layernorm_1p": False}
    return argparse.Namespace(**(args | over))


# ---- Hugging Face config.json ------------------------------------------------------------------
def test_llama_config_maps_exactly() -> None:
    hf = model_config_from_hf(LLAMA)
    m = hf.model
    assert (hf.architecture, hf.vocab_rows, hf.dtype) == ("LlamaForCausalLM", 512, "bfloat16")
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.head_dim) == (2, 64, 2, 16)
    assert (m.rotary_base, m.use_rope_scaling, m.rope_scaling_factor) == (500000, True, 32.0)
    assert not m.untie_embeddings_and_output_weights and m.swiglu and not m.add_qkv_bias
    legacy = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}  # transformers 4 format
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy |= {"rope_theta": 500000.0, "rope_scaling": scaling}
    assert model_config_from_hf(legacy).model == m
    assert architecture_for(m) == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "change, named",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
         "llama3 rope scaling with {'original_max_position_embeddings': 4096}"),
        ({"attention_bias": True}, "attention_bias true"),
        ({"mlp_bias": True}, "mlp_bias true"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_theta": 10000.5}}, "rope_theta 10000.5 is not an integer"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ],
)  # fmt: skip
def test_unsupported_hf_options_are_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(HFFormatError) as err:
        model_config_from_hf({**LLAMA, **change})
    assert named in str(err.value)


def test_qwen_and_mistral_specifics() -> None:
    qwen2 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
             "tie_word_embeddings": False}  # fmt: skip
    m2 = model_config_from_hf(qwen2).model
    assert m2.add_qkv_bias and not m2.qk_layernorm and m2.untie_embeddings_and_output_weights
    assert architecture_for(m2) == "Qwen2ForCausalLM"
    with pytest.raises(HFFormatError, match="use_sliding_window with sliding_window 64"):
        model_config_from_hf({**qwen2, "use_sliding_window": True, "sliding_window": 64})
    m3 = model_config_from_hf({**qwen2, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert m3.model.qk_layernorm and not m3.model.add_qkv_bias and m3.model.head_dim == 32
    assert architecture_for(m3.model) == "Qwen3ForCausalLM"
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    mistral = {**qwen2, "architectures": ["MistralForCausalLM"], "sliding_window": 64,
               "rope_parameters": linear}  # fmt: skip
    mm = model_config_from_hf(mistral)
    assert mm.model.max_position_embeddings == 64 and "sliding_window 64" in mm.notes[0]
    assert mm.model.rotary_seq_len_interpolation_factor == 2.0 and not mm.model.add_qkv_bias


def test_qkv_interleaving_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    heads, groups, hd, hidden = 8, 2, 4, 16
    q, k, v = (torch.randn(n * hd, hidden, generator=g) for n in (heads, groups, groups))
    fused = merge_qkv(q, k, v, heads, groups, hd)
    assert fused.shape == ((heads + 2 * groups) * hd, hidden)
    # group 1 holds query heads 4..7, then key head 1, then value head 1
    rows = fused.view(groups, heads // groups + 2, hd, hidden)[1]
    assert torch.equal(rows[0], q.view(heads, hd, hidden)[4])
    assert torch.equal(rows[-2], k.view(groups, hd, hidden)[1])
    for a, b in zip(split_qkv(fused, heads, groups, hd), (q, k, v), strict=True):
        assert torch.equal(a, b)
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    merged = merge_qkv(bias[0], bias[1], bias[2], heads, groups, hd)
    for a, b in zip(split_qkv(merged, heads, groups, hd), bias, strict=True):
        assert torch.equal(a, b)


def test_rope_variants_equal_transformers() -> None:
    """megatron-core's Llama 3 scaling and linear interpolation = transformers' frequencies."""
    transformers = pytest.importorskip("transformers")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    m = model_config_from_hf({**LLAMA, "max_position_embeddings": 16384}).model
    ours = RotaryEmbedding(m.head_dim, 1.0, rotary_base=m.rotary_base, rope_scaling=True,
                           rope_scaling_factor=m.rope_scaling_factor,
                           use_cpu_initialization=True)  # fmt: skip
    cfg = transformers.LlamaConfig(**{**LLAMA, "max_position_embeddings": 16384})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(ours.inv_freq, theirs, rtol=1e-6, atol=0)
    assert not torch.allclose(ours.inv_freq, RotaryEmbedding(16, 1.0, rotary_base=500000,
                              use_cpu_initialization=True).inv_freq)  # fmt: skip
    linear = RotaryEmbedding(16, 1.0, seq_len_interpolation_factor=2.0, rotary_base=10000,
                             use_cpu_initialization=True)  # fmt: skip
    cfg = transformers.LlamaConfig(**{**LLAMA, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})  # fmt: skip
    inv, _ = ROPE_INIT_FUNCTIONS["linear"](cfg, "cpu")
    torch.testing.assert_close(
        linear.get_freqs_non_repeated(64), torch.outer(torch.arange(64.0), inv)
    )


def test_sharded_safetensors_are_read_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from salt_megatron.hf.importer import SafetensorsReader

    a, b = torch.arange(4.0), torch.ones(2, 2)
    save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b, "x.rotary_emb.inv_freq": a}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
             "x.rotary_emb.inv_freq": "model-00002-of-00002.safetensors"}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    reader = SafetensorsReader(str(tmp_path))
    assert torch.equal(reader.get("b"), b) and reader.unused() == ["a"]  # inv_freq is ignorable
    with pytest.raises(HFFormatError, match="the weights have no tensor c"):
        reader.get("c")
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(HFFormatError, match="only safetensors weights are read"):
        SafetensorsReader(str(tmp_path))


# ---- Megatron-LM args ---------------------------------------------------------------------------
def test_megatron_lm_args_old_and_new_names() -> None:
    new = megatron_lm.model_config(megatron_lm_args("tok", rope_type="rope"), "ckpt")
    assert new == megatron_lm.model_config(megatron_lm_args("tok", new_names=False), "ckpt")
    assert new["norm_epsilon"] == 1e-5 and new["num_query_groups"] == 2 and new["use_rope_scaling"]
    # Megatron-LM's defaults: LayerNorm, GELU, biases, learned positions, tied embeddings.
    bare = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=4,
                              seq_length=16, max_position_embeddings=16)  # fmt: skip
    cfg = megatron_lm.model_config(bare, "ckpt")
    assert (cfg["normalization"], cfg["swiglu"], cfg["add_bias_linear"]) == (
        "LayerNorm",
        False,
        True,
    )
    assert cfg["position_embedding_type"] == "learned_absolute"
    assert not cfg["untie_embeddings_and_output_weights"] and cfg["num_query_groups"] is None
    legacy = argparse.Namespace(**vars(bare), use_rotary_position_embeddings=True,
                                disable_bias_linear=True)  # fmt: skip
    cfg = megatron_lm.model_config(legacy, "ckpt")
    assert cfg["position_embedding_type"] == "rope" and not cfg["add_bias_linear"]


def test_megatron_lm_unsupported_options_are_named() -> None:
    args = megatron_lm_args("tok", num_experts=8, multi_latent_attention=True,
                            rotary_percent=0.5, position_embedding_type="mrope",
                            layernorm_zero_centered_gamma=True, rope_type="yarn")  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        megatron_lm.model_config(args, "ckpt")
    for name in ("num_experts=8", "multi_latent_attention=True", "rotary_percent=0.5",
                 "position_embedding_type='mrope'",
                 "layernorm_zero_centered_gamma=True", "rope_type='yarn'"):  # fmt: skip
        assert name in str(err.value)
    with pytest.raises(CheckpointError, match="--tokenizer-type 'TikTokenizer' is not supported"):
        megatron_lm.tokenizer_spec(megatron_lm_args("t", tokenizer_type="TikTokenizer"), "ckpt")


# ---- untrusted pickles --------------------------------------------------------------------------
class _Payload:
    """Unpickling it would create a file (the stand-in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _save_dcp(path: Path, entries: dict[str, Any]) -> None:
    """A DCP checkpoint as megatron-core writes it (its planner stores BytesIO payloads as is)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    writer = FileSystemWriter(str(path))
    dcp_save(
        entries,
        storage_writer=writer,
        planner=MCoreSavePlanner(flatten_state_dict=False),
        no_dist=True,
    )
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                    "sharded_backend_version": 1}))  # fmt: skip


def _pickled(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_common_state_from_common_pt_and_from_dcp(tmp_path: Path) -> None:
    args = megatron_lm_args("tok")
    state = {"args": args, "iteration": 3, "checkpoint_version": 3.0}
    old = tmp_path / "old"
    _save_dcp(old, {"w": torch.ones(2)})
    torch.save(state, old / "common.pt")
    new = tmp_path / "new"  # newer megatron-core: the ShardedObject "common_state", payload [state]
    _save_dcp(new, {"w": torch.ones(2), COMMON_STATE_KEY: _pickled([state])})
    for path in (old, new):
        got = read_common_state(str(path))
        assert got["iteration"] == 3 and vars(got["args"]) == vars(args)


def test_untrusted_pickles_are_refused_unrun(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    bad = tmp_path / "bad"
    _save_dcp(bad, {"w": torch.ones(2), COMMON_STATE_KEY: _pickled([{"x": _Payload(str(victim))}])})
    with pytest.raises(
        CheckpointError, match=r"refusing to unpickle it: it needs the type io\.open"
    ):
        read_common_state(str(bad))
    torch.save({"args": _Payload(str(victim))}, bad / "common.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_common_state(str(bad))
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(victim)), f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle io\.open"):
        dcp_metadata(str(bad))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle io\.open"):
        load_weights(None, str(bad))  # the teacher's load: refused before DCP unpickles
    assert not victim.exists()


# ---- Megatron-LM teacher checks ----------------------------------------------------------------
def _megatron_lm_dir(root: Path, tokenizer_model: str, **over: Any) -> Path:
    """A Megatron-LM release checkpoint with only its common state (enough for the checks)."""
    release = root / "release"
    _save_dcp(release, {"w": torch.ones(2)})
    torch.save({"args": megatron_lm_args(tokenizer_model, **over), "iteration": 0,
                "checkpoint_version": 3.0}, release / "common.pt")  # fmt: skip
    (root / layout.TRACKER_FILE).write_text("release")
    return release


def test_megatron_lm_teacher_checks(tmp_path: Path) -> None:
    from salt_megatron.data.hf_tokenizer import train_bpe_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    tok = train_bpe_tokenizer(texts, tmp_path / "tok", 300)
    other = train_bpe_tokenizer(texts[::-1][:50], tmp_path / "other", 280)
    path = _megatron_lm_dir(tmp_path / "t", str(tmp_path / "moved"))
    ckpt = resolve_checkpoint(str(tmp_path / "t"))
    assert (ckpt.kind, ckpt.step, ckpt.path) == ("megatron-lm", 0, str(path))
    student = ["--mock-data", "--seq-length", "64", "--kd-teacher-load", str(tmp_path / "t"),
               "--kd-steps", "5"]  # fmt: skip
    cfg = parse_config(student)
    model = teacher_model_config(ckpt, cfg)
    assert (model.num_layers, model.head_dim, model.rotary_base) == (4, 16, 500000)
    with pytest.raises(TeacherError, match="pass --kd-teacher-tokenizer-model"):
        check_compatible(ckpt, model, cfg, tok.fingerprint, tok.vocab_size)
    wrong = parse_config([*student, "--kd-teacher-tokenizer-model", str(tmp_path / "other")])
    with pytest.raises(TeacherError, match="share one tokenizer") as err:
        check_compatible(ckpt, model, wrong, tok.fingerprint, tok.vocab_size)
    assert other.fingerprint in str(err.value) and tok.fingerprint in str(err.value)
    right = parse_config([*student, "--kd-teacher-tokenizer-model", str(tmp_path / "tok")])
    check_compatible(ckpt, model, right, tok.fingerprint, tok.vocab_size)
    with pytest.raises(TeacherError, match="training sequence length 64"):
        check_compatible(ckpt, model, parse_config([*student[:-4], "--seq-length", "96",
                         *student[3:], "--kd-teacher-tokenizer-model", str(tmp_path / "tok")]),
                         tok.fingerprint, tok.vocab_size)  # fmt: skip


def test_unsupported_megatron_lm_teacher_is_refused(tmp_path: Path) -> None:
    _megatron_lm_dir(tmp_path, "tok", num_experts=8)
    with pytest.raises(
        TeacherError, match="Megatron-LM options this teacher cannot run: num_experts=8"
    ):
        resolve_checkpoint(str(tmp_path))
    os.remove(tmp_path / "release" / "common.pt")
    with pytest.raises(
        TeacherError, match=r"salt_meta\.json is missing, and there is no Megatron-LM"
    ):
        resolve_checkpoint(str(tmp_path))


def test_teacher_rows_must_cover_the_tokenizer() -> None:
    check_vocab_rows(152064, 151665, "7B")  # Qwen2.5-7B's padding, larger than 0.5B's 151936
    check_vocab_rows(151936, 151665, "0.5B")
    with pytest.raises(TeacherError, match=r"embeds 151552 vocabulary rows .* 151665 tokens"):
        check_vocab_rows(151552, 151665, "x")
