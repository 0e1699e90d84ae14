"""The GPT shape sections: the student's ``model``, the teacher's ``teacher`` (``--teacher-*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    num_experts: int | None = None
    """Experts per mixture-of-experts (MoE) layer; None: a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Width of each expert's MLP; None: --ffn-hidden-size."""
    moe_layer_freq: list[int] = field(default_factory=lambda: [1])
    """Which layers are MoE layers: one number N (an MoE layer every N layers, layer 0 first), or
    one 0/1 entry per layer (1: MoE, 0: dense MLP), as Megatron-LM's pattern."""
    moe_shared_expert_intermediate_size: int | None = None
    """Width of the shared expert every token also passes through (all shared experts together);
    None: no shared expert."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss of the router: over the micro-batch (aux_loss, Switch/GShard), per
    sequence (seq_aux_loss, DeepSeek-V2), or none."""
    moe_aux_loss_coeff: float = 0.0
    """Scale of the load-balancing loss added to the training loss (0: none)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k (the k probabilities then do not sum to 1;
    Qwen3-MoE with norm_topk_prob false); default: softmax over the top-k logits (Mixtral)."""
    moe_expert_capacity_factor: float | None = None
    """Tokens an expert takes per micro-batch, as a multiple of an even share; tokens past it are
    dropped. None: dropless (every token reaches its k experts)."""
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    """With a capacity factor, which tokens an expert drops: the lowest routing probabilities, or
    the latest positions."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "allgather"
    """How tokens reach their experts: all-gather over the expert-parallel and TP ranks,
    all-to-all (each token only to its experts' ranks), or flex (DeepEP; GPUs only)."""
    moe_grouped_gemm: bool = False
    """Run a rank's experts as one grouped GEMM (Transformer Engine's TEGroupedMLP; needs
    --transformer-impl transformer_engine and a GPU) instead of one MLP after another."""

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
        self._check_moe()

    def _check_moe(self) -> None:
        prefix = self.FLAG_PREFIX
        check_positive(self, prefix, "num_experts", "moe_router_topk", "moe_ffn_hidden_size")
        check_positive(self, prefix, "moe_shared_expert_intermediate_size")
        check_positive(self, prefix, "moe_expert_capacity_factor")
        check(self.moe_aux_loss_coeff >= 0, f"{flag('moe_aux_loss_coeff', prefix)} must be >= 0")
        self.moe_layer_pattern()  # checks --moe-layer-freq
        if self.num_experts is None:
            moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                        "moe_expert_capacity_factor")  # fmt: skip
            given = [flag(n, prefix) for n in moe_only if getattr(self, n) is not None]
            given += [flag("moe_grouped_gemm", prefix)] if self.moe_grouped_gemm else []
            check(not given, f"{', '.join(given)} need {flag('num_experts', prefix)}")
            return
        check(
            self.moe_router_topk <= self.num_experts,
            f"{flag('moe_router_topk', prefix)} {self.moe_router_topk} exceeds "
            f"{flag('num_experts', prefix)} {self.num_experts}",
        )
        check(
            self.moe_router_topk > 1 or self.moe_router_pre_softmax,
            f"{flag('moe_router_topk', prefix)} 1 needs {flag('moe_router_pre_softmax', prefix)} "
            "(a softmax over the one chosen logit is always 1)",
        )
        check(
            not (self.add_bias_linear and self.moe_shared_expert_intermediate_size),
            f"{flag('moe_shared_expert_intermediate_size', prefix)} does not support "
            f"{flag('add_bias_linear', prefix)} (megatron-core's shared experts have no biases)",
        )
        check(
            not self.moe_grouped_gemm or self.transformer_impl == "transformer_engine",
            f"{flag('moe_grouped_gemm', prefix)} needs --transformer-impl transformer_engine "
            "(TEGroupedMLP)",
        )

    @property
    def is_moe(self) -> bool:
        """Whether the model has mixture-of-experts layers."""
        return self.num_experts is not None and any(self.moe_layer_pattern())

    def moe_layer_pattern(self) -> list[int]:
        """1 for every MoE layer, 0 for every dense one (length --num-layers; all 0 when dense).

        ``--moe-layer-freq N``: layers 0, N, 2N... are MoE layers; ``num_layers`` 0/1 entries:
        that pattern.
        """
        prefix, freq = self.FLAG_PREFIX, self.moe_layer_freq
        name = flag("moe_layer_freq", prefix)
        if self.num_experts is None:
            return [0] * self.num_layers
        if len(freq) == 1 and freq[0] >= 1:
            return [1 if i % freq[0] == 0 else 0 for i in range(self.num_layers)]
        check(
            len(freq) == self.num_layers and set(freq) <= {0, 1},
            f"{name} {freq}: give one number N >= 1 (an MoE layer every N layers) or "
            f"{self.num_layers} entries of 0 (dense) and 1 (MoE), one per layer",
        )
        return list(freq)

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
