"""Routing statistics of the student's MoE layers, per layer, over a logging window.

Each router of the student's chunks gets a forward hook that adds, on the device (no host read
per micro-batch), the (token, expert) assignments it kept to ``kept[layer, expert]`` and the
``tokens x k`` it was asked to route to ``routed[layer]``. Only training forwards with autograd
count: evaluation does not, and under full activation recomputation the first (no-grad) forward
does not, so every micro-batch counts once. megatron's own layer-wise tracker holds each
layer's load-balancing loss (``aux_loss / coeff`` summed over the rank's micro-batches; under
sequence parallelism each TP rank holds its part of it).

At a log step :meth:`MoEMetrics.collect` sums all of it over the world in one all-reduce (a
layer lives on one pipeline stage; TP ranks route disjoint tokens under sequence parallelism;
DP ranks route different micro-batches) and reads it once. Per MoE layer ``i`` (0-based):

* ``layer{i}/load_max_over_mean``: tokens of the busiest expert over the mean per expert (1 is
  perfect balance; ``E`` is every token on one expert),
* ``layer{i}/dropped``: fraction of the ``tokens x k`` assignments dropped by the capacity
  factor (0 without one),
* ``layer{i}/load_balancing_loss``: megatron's loss without its coefficient, averaged over the
  window's micro-batches (with ``--moe-aux-loss-coeff`` > 0),

and their means over the MoE layers (``load_max_over_mean``, ``dropped``,
``load_balancing_loss``), as Megatron-LM logs the last one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils

from salt_megatron.models.moe import moe_router_modules


class MoEMetrics:
    """Per-layer routing counts of the student's routers (every rank builds one)."""

    def __init__(self, chunks: list[torch.nn.Module], num_layers: int, num_experts: int,
                 topk: int, tp: int, device: torch.device) -> None:  # fmt: skip
        self.num_layers, self.tp = num_layers, tp
        self.kept = torch.zeros(num_layers, num_experts, device=device)
        self.routed = torch.zeros(num_layers, device=device)
        self.forwards = torch.zeros(num_layers, device=device)
        """Router calls per layer: micro-batches x TP ranks (each routes its share)."""
        self.topk = topk
        self.layers: list[int] = []
        for chunk in chunks:
            for number, router in moe_router_modules(chunk):
                router.register_forward_hook(self._hook(number - 1))
                self.layers.append(number - 1)

    def _hook(self, index: int) -> Any:
        def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            _, routing_map = output
            with torch.no_grad():
                self.kept[index] += routing_map.sum(dim=0)
                self.routed[index] += routing_map.shape[0] * self.topk
                self.forwards[index] += 1

        return count

    def _aux_losses(self) -> torch.Tensor:
        """megatron's tracked load-balancing losses per layer (zeros when none is tracked)."""
        total = torch.zeros(self.num_layers, device=self.kept.device)
        for entry in moe_utils.get_moe_layer_wise_logging_tracker().values():
            values = entry["values"]
            total[: values.numel()] += values.to(total.device, torch.float32)
        return total

    def collect(self) -> dict[str, float]:
        """The window's metrics (collective over the world; one host read); resets the window."""
        flat = torch.cat([self.kept.flatten(), self.routed, self.forwards, self._aux_losses()])
        dist.all_reduce(flat)
        values = flat.tolist()  # once per logging window
        n, e = self.num_layers, self.kept.shape[1]
        kept = [values[i * e : (i + 1) * e] for i in range(n)]
        routed, forwards = values[n * e : n * e + n], values[n * e + n : n * e + 2 * n]
        aux = values[n * e + 2 * n :]
        out: dict[str, float] = {}
        for i in range(n):
            if routed[i] == 0:
                continue  # a dense layer, or no training forward in the window
            mean = sum(kept[i]) / e
            out[f"layer{i}/load_max_over_mean"] = max(kept[i]) / mean if mean else float("nan")
            out[f"layer{i}/dropped"] = 1.0 - sum(kept[i]) / routed[i]
            if aux[i] != 0.0:
                out[f"layer{i}/load_balancing_loss"] = aux[i] * self.tp / forwards[i]
        for name in ("load_max_over_mean", "dropped", "load_balancing_loss"):
            per_layer = [v for k, v in out.items() if k.endswith("/" + name)]
            if per_layer:
                out[name] = sum(per_layer) / len(per_layer)
        self.kept.zero_()
        self.routed.zero_()
        self.forwards.zero_()
        moe_utils.clear_aux_losses_tracker()
        return out
