"""The GPT shape sections: the student's ``model``, the teacher's ``teacher`` (``--teacher-*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from salt_megatron.config.base import check, check_positive, flag


@dataclass
class ModelConfig:
    """Shape of a GPT model (the student, or the teacher under ``--teacher-*`` flags)."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads per layer."""
    num_query_groups: int | None = None
    """Key/value head groups for grouped-query attention; None means one per head (MHA)."""
    kv_channels: int | None = None
    """Width of each attention head (query, key and value); None means hidden / heads."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 x hidden (or 8/3 x hidden rounded to 64 with --swiglu)."""
    vocab_size: int | None = None
    """Vocabulary size before padding; None takes it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size, as Megatron does."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary (rope) or learned absolute position embeddings."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    use_rope_scaling: bool = False
    """Llama 3.x RoPE frequency scaling (megatron-core's: low/high frequency factors 1 and 4,
    original context 8192)."""
    rope_scaling_factor: float = 8.0
    """Factor of the Llama 3.x RoPE scaling (with --use-rope-scaling)."""
    rotary_seq_len_interpolation_factor: float | None = None
    """Linear RoPE position interpolation: positions are divided by this factor (Hugging Face's
    'linear' rope scaling); None: no interpolation."""
    max_position_embeddings: int = 4096
    """Largest sequence length the position embeddings support."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer type."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    swiglu: bool = True
    """Gated SiLU MLP (SwiGLU) instead of a GELU MLP."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output projection weights."""
    add_bias_linear: bool = False
    """Biases in the linear layers."""
    add_qkv_bias: bool = False
    """Biases in the query/key/value projection only (Qwen2); --add-bias-linear implies them."""
    qk_layernorm: bool = False
    """Normalise every query and key head (the layers' norm type, width kv-channels) before RoPE
    (Qwen3)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual stream."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: megatron-core's local modules, or Transformer Engine (needs TE)."""

    FLAG_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        prefix = self.FLAG_PREFIX
        check_positive(self, prefix, "num_layers", "hidden_size", "num_attention_heads")
        check_positive(self, prefix, "num_query_groups", "ffn_hidden_size", "vocab_size")
        check_positive(self, prefix, "make_vocab_size_divisible_by", "max_position_embeddings")
        check_positive(self, prefix, "kv_channels", "rope_scaling_factor")
        check_positive(self, prefix, "rotary_seq_len_interpolation_factor")
        rope_options = self.use_rope_scaling or self.rotary_seq_len_interpolation_factor
        check(
            not rope_options or self.position_embedding_type == "rope",
            f"{flag('use_rope_scaling', prefix)} and "
            f"{flag('rotary_seq_len_interpolation_factor', prefix)} need rope position "
            f"embeddings, not {self.position_embedding_type}",
        )
        check(
            not (self.use_rope_scaling and self.rotary_seq_len_interpolation_factor),
            f"{flag('use_rope_scaling', prefix)} and "
            f"{flag('rotary_seq_len_interpolation_factor', prefix)} are two RoPE scalings: "
            "use one",
        )
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"{flag('hidden_size', prefix)} {self.hidden_size} is not divisible by "
            f"{flag('num_attention_heads', prefix)} {self.num_attention_heads}",
        )
        if self.num_query_groups is not None:
            check(
                self.num_attention_heads % self.num_query_groups == 0,
                f"{flag('num_attention_heads', prefix)} {self.num_attention_heads} is not "
                f"divisible by {flag('num_query_groups', prefix)} {self.num_query_groups}",
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{flag(name, prefix)} must be in [0, 1), got {value}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: --kv-channels, else hidden / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate_tp(self, tp: int, tp_flag: str) -> None:
        """Check divisibility by a tensor-parallel size (named by ``tp_flag`` in messages)."""
        prefix = self.FLAG_PREFIX
        check(
            self.num_attention_heads % tp == 0,
            f"{flag('num_attention_heads', prefix)} {self.num_attention_heads} is not divisible "
            f"by {tp_flag} {tp}",
        )
        groups = self.num_query_groups or self.num_attention_heads
        check(
            groups % tp == 0,
            f"{flag('num_query_groups', prefix)} {groups} is not divisible by {tp_flag} {tp}",
        )


@dataclass
class TeacherModelConfig(ModelConfig):
    """Shape of the teacher GPT (flags ``--teacher-*``); it must share the student's tokenizer."""

    FLAG_PREFIX: ClassVar[str] = "teacher-"
