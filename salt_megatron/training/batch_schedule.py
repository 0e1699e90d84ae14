"""Global batch size per optimizer step: constant, or ramped up by megatron-core's calculator.

``--rampup-batch-size start increment samples`` (Megatron-LM's flag): the global batch starts at
``start`` sequences and grows by ``increment`` each time another ``samples / n_increments``
samples have been consumed, until it reaches ``--global-batch-size``. The size of a step depends
only on the samples consumed before it, so a resumed run (which restores ``consumed_samples``)
continues the ramp exactly. Everything else stays counted in optimizer steps: ``--train-iters``,
the LR schedule, the KD phase and its weight schedule (Megatron-LM allows a ramp-up only with
sample-based training; SALT's phases are defined in steps, so the ramp-up is too).
"""

from __future__ import annotations

from megatron.core.num_microbatches_calculator import (
    ConstantNumMicroBatchesCalculator,
    NumMicroBatchesCalculator,
    RampupBatchsizeNumMicroBatchesCalculator,
)

from salt_megatron.config.schema import TrainingConfig


def build_calculator(tr: TrainingConfig, dp: int, rank: int = 0) -> NumMicroBatchesCalculator:
    """megatron-core's micro-batch calculator for ``tr`` at data-parallel size ``dp``."""
    if tr.rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(
            tr.global_batch_size, tr.micro_batch_size, dp, False, rank
        )
    start, increment, samples = tr.rampup_batch_size
    return RampupBatchsizeNumMicroBatchesCalculator(
        tr.global_batch_size, tr.micro_batch_size, dp, False, rank, start, increment, samples
    )


class BatchSchedule:
    """Global batch size and micro-batches per data-parallel rank of each optimizer step."""

    def __init__(self, tr: TrainingConfig, dp: int) -> None:
        self.ramp = tr.rampup_batch_size
        self.micro_batch_size = tr.micro_batch_size
        self.dp = dp
        self._calc = build_calculator(tr, dp)

    def at(self, consumed_samples: int) -> tuple[int, int]:
        """``(global batch size, micro-batches per DP rank)`` of the step after that many samples.

        Raises megatron's assertion when the size is not a multiple of micro-batch x DP (the
        config's ``validate_world`` checks every size of the ramp beforehand).
        """
        self._calc.update(consumed_samples, consistency_check=True)
        return self._calc.get_current_global_batch_size(), self._calc.get()

    def samples_before(self, step: int) -> int:
        """Samples consumed by the optimizer steps ``0 .. step-1`` (a fresh run's position)."""
        consumed = 0
        for done in range(step):
            gbs, _ = self.at(consumed)
            if self.ramp is None or consumed > self.ramp[2]:  # the ramp is over: constant from here
                return consumed + (step - done) * gbs
            consumed += gbs
        return consumed
