"""Export to Hugging Face: a GQA model saved at TP=2 -> tools/export_hf.py -> LlamaForCausalLM.

Two ranks build a tiny GQA model (random norm weights, non-default RoPE base, padded vocab),
compute its full logits on a random batch and save it as our checkpoint; the export runs as its
own process (world 1, TP=1); transformers loads the folder and must reproduce the logits of the
true-vocabulary columns within 1e-4, and its tokenizer must encode like ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from salt_megatron.config.schema import ModelConfig
from tests.distributed.launcher import run_distributed
from tests.docstring_data import docstring_texts, train_test_tokenizer
from tests.integration.tiny_gpt import export_hf, save_tiny_gpt

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
VOCAB = 300


def _tokenizer(tmp: Path) -> str:
    return train_test_tokenizer(docstring_texts(20_000), tmp / "tok", VOCAB)


def _save_tp2(root: str, tokenizer_model: str, tokens: torch.Tensor) -> torch.Tensor:
    """The tiny model at TP=2, saved; its full logits ``[b, s, padded V]``."""
    logits = save_tiny_gpt(root, tokenizer_model, VOCAB, 0.2, tokens)
    assert logits is not None
    return logits


def test_refuses_what_no_architecture_expresses() -> None:
    from salt_megatron.hf.format import HFFormatError, architecture_for

    with pytest.raises(HFFormatError, match=r"LayerNorm.*SwiGLU.*learned_absolute"):
        architecture_for(
            ModelConfig(
                normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute"
            )
        )
    with pytest.raises(HFFormatError, match="QKV bias together with QK layernorm"):
        architecture_for(ModelConfig(add_qkv_bias=True, qk_layernorm=True))


def test_export_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tok = _tokenizer(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    root = str(tmp_path / "ckpt")
    ours = run_distributed(_save_tp2, 2, root, tok, tokens)[0]
    assert ours.shape == (2, 24, 512)
    out = tmp_path / "hf"
    export_hf(root, out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 5000.0 and config["tie_word_embeddings"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(out), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    assert theirs.shape == (2, 24, VOCAB)
    diff = (theirs - ours[..., :VOCAB]).abs().max().item()
    assert diff < 1e-4, diff
    assert ours[..., :VOCAB].std().item() > 0.1  # non-trivial logits

    from salt_megatron.data.tokenizer import SentencePieceTokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Return the number of items in a container.\nExample: len([1, 2])"
    assert hf_tok.encode(text, add_special_tokens=False) == SentencePieceTokenizer(tok).tokenize(
        text
    )
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (1, 2, 0)
