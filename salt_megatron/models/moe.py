"""Mixture-of-experts layers on megatron-core: the local MoE spec, layout-independent expert init.

An MoE layer is megatron's ``MoELayer`` (router -> token dispatcher -> experts -> combine, plus
an optional shared expert) built from :func:`moe_mlp_spec`. Two things differ from megatron's
own local spec:

* :class:`SeededSequentialMLP`: each expert's weights are drawn from a generator seeded by its
  *global* expert index, so a model built at any expert-parallel size holds the same experts
  (megatron draws the local experts one after another from whatever state the RNG is in: at
  EP 2 the second rank's experts 2 and 3 would get the weights of experts 0 and 1).
* :class:`TokenScaledRouter`: the load-balancing loss gradient does not depend on how the
  sequence is split over the tensor-parallel ranks (see its docstring).

GPU-only experts and dispatchers (``--moe-grouped-gemm``: Transformer Engine's
``TEGroupedMLP``; ``--moe-token-dispatcher-type flex``: DeepEP) are megatron's own, reached
through its Transformer Engine spec; :func:`check_moe_device` refuses them without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from salt_megatron.config.schema import ModelConfig


class MoEUnavailable(RuntimeError):
    """An MoE option that needs a GPU (or Transformer Engine) was asked for without one."""


def check_moe_device(model: ModelConfig) -> None:
    """Refuse the GPU-only MoE paths on a machine without CUDA; the error names the flag
    (``--teacher-*`` for the teacher's)."""
    if not model.is_moe or torch.cuda.is_available():
        return
    prefix = model.FLAG_PREFIX
    if model.moe_grouped_gemm:
        raise MoEUnavailable(
            f"--{prefix}moe-grouped-gemm needs a GPU (Transformer Engine's grouped GEMM); on "
            "the CPU experts run one after another: drop the flag"
        )
    if model.moe_token_dispatcher_type == "flex":
        raise MoEUnavailable(
            f"--{prefix}moe-token-dispatcher-type flex needs GPUs (DeepEP kernels); use "
            "alltoall or allgather"
        )


def without_te_gemm() -> None:
    """Let megatron's router run without Transformer Engine.

    megatron-core 0.16.1's ``RouterGatingLinearFunction`` tests ``te_general_gemm is not None``
    but ``moe_utils`` defines that name only when TE imports: without TE every router forward is
    a ``NameError``. Defining it as None selects megatron's own ``torch.mm`` path.
    """
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]


class SeededSequentialMLP(SequentialMLP):
    """megatron's ``SequentialMLP`` whose expert ``e`` is drawn from seed ``base + e``.

    ``base`` is drawn from the default generator when the layer's experts are built: the layer
    seeded it by its global index (:class:`~salt_megatron.models.gpt.SeededTransformerLayer`)
    and drew its attention and router weights at full size, so ``base`` is the same at every
    layout. After its experts the generator is reseeded with ``base + num_experts``: the shared
    expert that follows draws alike whatever the number of local experts. (With CPU
    initialisation, which draws full expert weights before slicing them for expert TP.)

    Every expert parameter is marked expert-parallel (``allreduce = False``), also at EP 1,
    where megatron would treat experts as plain data-parallel parameters: megatron's DDP then
    keeps them in its expert gradient buffers (reduced over the expert data-parallel group,
    which at EP 1 is the data-parallel group: the same sums) and its optimizer in a second,
    chained optimizer. The optimizer, and so the checkpoint's optimizer state, then has the
    same two parts at every EP size, and a run resumes at another EP.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        assert pg_collection is not None
        super().__init__(0, config, submodules, pg_collection)
        base = int(torch.randint(0, 2**62, (1,)).item())  # host tensor: no device sync
        first = pg_collection.ep.rank() * num_local_experts
        for i in range(num_local_experts):
            torch.manual_seed(base + first + i)
            expert = MLP(
                self.config,
                submodules,
                ffn_hidden_size=self.config.moe_ffn_hidden_size,
                is_expert=True,
                tp_group=pg_collection.expt_tp,
            )
            self.local_experts.append(expert)
        self.num_local_experts = num_local_experts
        for param in self.parameters():
            param.allreduce = False  # type: ignore[attr-defined]
        assert config.num_moe_experts is not None
        torch.manual_seed(base + config.num_moe_experts)


class TokenScaledRouter(TopKRouter):
    """megatron's ``TopKRouter`` with the load-balancing loss scaled by the micro-batch's tokens.

    With ``calculate_per_token_loss`` megatron divides every gradient by the global count of
    loss tokens, so the router multiplies its load-balancing loss by the tokens it routed
    (``MoEAuxLossAutoScaler``) to keep it a per-micro-batch loss. Under sequence (and context)
    parallelism each rank routes only its ``1/(TP x CP)`` share of the micro-batch, and megatron
    0.16.1 multiplies each rank's part of the loss by that local count: summed over the ranks,
    the gradient is ``1/(TP x CP)`` of the unsplit one. Here each part is multiplied by the
    micro-batch's tokens over the whole sequence-parallel group, so the gradient is the same at
    every layout (and equals the single-rank loss ``coeff x E x sum_i f_i P_i`` per micro-batch).
    """

    def attach_and_log_load_balancing_loss(  # type: ignore[no-untyped-def]
        self,
        activation,
        aux_loss_coeff,
        aux_loss,
        aux_loss_name,
        reduce_group,
        reduce_group_has_dp=False,
        valid_token_count=None,
    ):
        tokens = activation.shape[0] if valid_token_count is None else valid_token_count
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp, valid_token_count=tokens * self.tp_cp_group.size(),
        )  # fmt: skip


def moe_mlp_spec() -> ModuleSpec:
    """The MLP of an MoE layer with megatron's local modules (CPU or GPU, no TE)."""
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=SeededSequentialMLP, submodules=linears),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=linears),
            router=TokenScaledRouter,
        ),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def moe_router_modules(model: torch.nn.Module) -> list[tuple[int, TopKRouter]]:
    """``(global layer number, router)`` of every MoE layer in ``model`` (a chunk)."""
    found: list[tuple[int, Any]] = []
    for module in model.modules():
        if isinstance(module, TopKRouter):
            found.append((int(module.layer_number), module))
    return found
