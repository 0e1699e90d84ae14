"""The training loop: megatron-core schedules, DDP, optimizer, LR schedule, logging."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import SaltConfig
from salt_megatron.data.batches import MicroBatchIterator, stage_iterators
from salt_megatron.models import flops as model_flops
from salt_megatron.models.fp8 import check_fp8
from salt_megatron.models.student import build_student_chunks, count_parameters, wrap_ddp
from salt_megatron.parallel.state import StudentLayout, init_student_parallel, reseed
from salt_megatron.runtime import device
from salt_megatron.training import metrics
from salt_megatron.training.batch_schedule import BatchSchedule
from salt_megatron.training.logger import MetricsWriter, log, setup_console
from salt_megatron.training.moe_metrics import MoEMetrics
from salt_megatron.training.optimizer import build_optimizer, build_scheduler, guarded_step
from salt_megatron.training.phase import KDPhase
from salt_megatron.training.profiling import StepProfiler
from salt_megatron.training.step import METRICS, lm_forward_step, sft_forward_step, sum_reports
from salt_megatron.training.tracking import require_wandb, start_wandb


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm, beyond the --skip-nonfinite-steps budget."""


@dataclass
class StepResult:
    """What one optimizer step produced (identical on every rank)."""

    loss: float
    lm_loss: float
    kd_loss: float
    top1_agree: float
    kd_gate_on: float
    kd_weight: float
    kd_phase: bool
    grad_norm: float
    lr: float
    tokens: int
    updated: bool
    seconds: float
    batch_size: int


def kd_columns(window: list[StepResult], gate: bool) -> dict[str, float]:
    """The KD columns of a log window: those of its last KD step (a window that ends past the
    switch to plain training still shows the KD phase's end), none without a KD step.
    ``kd_gate_on`` (the fraction of tokens KD applied to) only with a gate."""
    kd_steps = [r for r in window if r.kd_phase]
    if not kd_steps:
        return {}
    last = kd_steps[-1]
    columns = {"lm_loss": last.lm_loss, "kd_loss": last.kd_loss, "kd_weight": last.kd_weight,
               "top1_agree": last.top1_agree}  # fmt: skip
    return columns | ({"kd_gate_on": last.kd_gate_on} if gate else {})


class Trainer:
    """Builds the student on megatron's global parallel state and trains it.

    ``datasets`` is ``(train, valid)``: indexable GPT datasets yielding megatron's sample dicts;
    ``kd_train`` an optional separate training set for the KD phase (SALT_DS selection).
    ``tokenizer_fingerprint`` identifies the tokenizer (checked against the teacher's);
    ``kd_targets`` a :class:`~salt_megatron.data.teacher_targets.TargetStore` (``--kd-targets``).
    ``padded_vocab`` overrides the padded vocabulary (a pretrained checkpoint's, under ``--sft``).
    With ``--sft`` the datasets hold packed sequences: every pipeline stage reads them (for the
    attention mask) and :func:`~salt_megatron.training.step.sft_forward_step` runs them.
    """

    def __init__(
        self,
        cfg: SaltConfig,
        datasets: tuple[Any, Any | None],
        vocab_size: int,
        kd_train: Any | None = None,
        tokenizer_fingerprint: str = "",
        kd_targets: Any | None = None,
        padded_vocab: int | None = None,
    ) -> None:
        self.cfg = cfg
        check_fp8(cfg.training.fp8_format, cfg.training.fp8_recipe)  # before any group exists
        require_wandb(cfg.logging)
        self.layout: StudentLayout = init_student_parallel(cfg.parallel, cfg.training.seed)
        self.world_size = dist.get_world_size()
        self.is_logging_rank = dist.get_rank() == self.world_size - 1
        setup_console(self.is_logging_rank)
        self.vocab_size = vocab_size
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.padded_vocab = padded_vocab or mcfg.padded_vocab_size(
            vocab_size, cfg.model.make_vocab_size_divisible_by, self.layout.tp
        )
        self.tf_config = mcfg.student_transformer_config(cfg)
        chunks = build_student_chunks(cfg, self.tf_config, self.padded_vocab)
        reseed(cfg.training.seed)  # dropout streams independent of how many weights were drawn
        self.model = wrap_ddp(cfg, self.tf_config, chunks)
        self._install_grad_hooks()
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.batches = BatchSchedule(cfg.training, self.layout.dp)
        self.profiler = StepProfiler(cfg.logging, dist.get_rank())
        self.train_ds, self.valid_ds = datasets
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.after_step: Callable[[], bool] | None = None
        """Called after each step (and its log/eval); True stops training (the checkpointer)."""
        self.packed = cfg.sft.sft
        self.base_step = sft_forward_step if self.packed else lm_forward_step
        """The forward step outside the KD phase (and of every evaluation)."""
        self.eval_iters = cfg.training.eval_iters
        """Micro-batches per DP rank of each validation (SFT: the whole held-out set)."""
        self.log_columns: Callable[[list[StepResult]], dict[str, float]] | None = None
        """Extra console/TensorBoard columns of a log window (SFT: response tokens, epoch)."""
        wandb_run = start_wandb(cfg) if self.is_logging_rank and cfg.logging.wandb_project else None
        self.writer = MetricsWriter(
            cfg.logging.tensorboard_dir, self.is_logging_rank, cfg.logging.metrics_file, wandb_run
        )
        self.kd = KDPhase(
            cfg, self.layout, vocab_size, self.padded_vocab, tokenizer_fingerprint, kd_train,
            self.writer, kd_samples=self.batches.samples_before(cfg.distill.kd_steps),
            kd_targets=kd_targets,
        )  # fmt: skip
        self.train_iters: list[MicroBatchIterator | None] = []
        self.reset_data_position()
        self._flops_per_token = model_flops.train_flops_per_token(
            cfg.model, cfg.data.seq_length, self.padded_vocab
        )
        self.moe = self._moe_metrics()
        self._log_layout()

    # ---- set-up ----------------------------------------------------------------------------
    def _log_layout(self) -> None:
        """One line: this rank's parameter count, the layout and the micro-batches per step."""
        n_params = count_parameters(self.model)
        lay = self.layout
        experts = (
            f" EP={lay.ep} expert-TP={lay.etp} expert-DP={lay.edp}" if self.cfg.model.is_moe else ""
        )
        log.info(
            f"student: {n_params / 1e6:.2f}M parameters on this rank | layout TP={lay.tp} "
            f"PP={lay.pp} VPP={lay.vpp} DP={lay.dp}{experts} | "
            f"padded vocab {self.padded_vocab} | micro-batches/step: {self.num_microbatches}"
        )

    def _moe_metrics(self) -> MoEMetrics | None:
        model = self.cfg.model
        if not model.is_moe:
            return None
        assert model.num_experts is not None
        chunks = [chunk.module for chunk in self.model]
        return MoEMetrics(chunks, model.num_layers, model.num_experts, model.moe_router_topk,
                          self.layout.tp, device())  # fmt: skip

    @property
    def num_microbatches(self) -> int:
        """Micro-batches of the next step on each data-parallel rank."""
        return self.batches.at(self.consumed_samples)[1]

    def _install_grad_hooks(self) -> None:
        cfg = self.tf_config
        no_sync = [chunk.no_sync for chunk in self.model]
        cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync  # type: ignore[assignment]
        if self.cfg.parallel.overlap_grad_reduce:
            sync = [chunk.start_grad_sync for chunk in self.model]
            cfg.grad_sync_func = sync[0] if len(sync) == 1 else sync  # type: ignore[assignment]
        if self.cfg.parallel.align_param_gather:  # the schedule launches every stage's all-gather
            gather = [chunk.start_param_sync for chunk in self.model]
            cfg.param_sync_func = gather[0] if len(gather) == 1 else gather  # type: ignore[assignment]
        cfg.finalize_model_grads_func = finalize_model_grads

    def reset_data_position(self) -> None:
        """(Re)build the training iterators for the current step (after a load, at the switch)."""
        dataset, consumed = self.kd.data_position(self.step, self.consumed_samples, self.train_ds)
        every_stage = self.kd.tokens_on_every_stage(self.step)
        self.train_iters = self._iterators(dataset, consumed, every_stage)

    def _iterators(
        self, dataset: Any, consumed: int, every_stage: bool = False
    ) -> list[MicroBatchIterator | None]:
        uses = [self.packed or bool(c.module.pre_process or c.module.post_process)
                for c in self.model]  # fmt: skip
        if every_stage and not any(uses):
            uses[0] = True  # a middle stage reads the tokens for the KD step's teacher pass
        return stage_iterators(
            dataset,
            self.cfg.training.micro_batch_size,
            self.layout.dp_rank,
            self.layout.dp,
            consumed,
            uses,
            num_workers=self.cfg.data.num_workers,
            pin_memory=device().type == "cuda",
        )

    # ---- one step ----------------------------------------------------------------------------
    def _forward_backward(
        self,
        iterators: list[MicroBatchIterator | None],
        n_micro: int,
        forward_only: bool,
        forward_step: Any = lm_forward_step,
    ) -> torch.Tensor:
        """Run the schedule; return the global :data:`METRICS` sums on every rank."""
        fwd_bwd = get_forward_backward_func()
        interleaved = self.layout.vpp is not None
        tr = self.cfg.training
        reports = fwd_bwd(
            forward_step_func=self.profiler.annotate(forward_step),
            data_iterator=iterators if interleaved else iterators[0],
            model=self.model if interleaved else self.model[0],
            num_microbatches=n_micro,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=tr.micro_batch_size,
            forward_only=forward_only,
        )
        totals = sum_reports(reports)
        if self.layout.is_last_stage:
            dist.all_reduce(totals, group=self.layout.dp_group)
        else:
            totals.zero_()
        dist.all_reduce(totals, group=self.layout.pp_group)  # last stage -> every stage
        return totals

    def train_step(self) -> StepResult:
        """One optimizer step over the global batch (its size set by the batch schedule)."""
        start = time.perf_counter()
        batch_size, n_micro = self.batches.at(self.consumed_samples)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.kd.sync(self.step):
            self.reset_data_position()  # the KD phase just ended: switch to the main data
        forward_step = self.kd.forward_step(self.step) or self.base_step
        iterators = self.kd.step_iterators(self.train_iters, n_micro)
        totals = self._forward_backward(iterators, n_micro, False, forward_step)
        sums = totals.tolist()  # the step's one read of the loss on the host
        means = [x / max(sums[-1], 1.0) for x in sums]
        loss = means[0]
        lr = self.optimizer.param_groups[0]["lr"]
        updated, grad_norm = False, float("nan")
        if math.isfinite(loss):
            updated, grad_norm = guarded_step(self.optimizer, self.cfg.optim.clip_grad)
        if updated:
            self.scheduler.step(increment=1)
        else:
            self._count_skip(loss, grad_norm)
        self.step += 1
        self.consumed_samples += batch_size
        return StepResult(
            loss=loss,
            lm_loss=means[METRICS.index("lm_loss")],
            kd_loss=means[METRICS.index("kd_loss")],
            top1_agree=means[METRICS.index("top1_agree")],
            kd_gate_on=means[METRICS.index("kd_gate_on")],
            kd_weight=self.kd.weight(self.step - 1),
            kd_phase=forward_step is not self.base_step,
            grad_norm=grad_norm,
            lr=lr,
            tokens=int(sums[-1]),
            updated=updated,
            seconds=time.perf_counter() - start,
            batch_size=batch_size,
        )

    def _count_skip(self, loss: float, grad_norm: float) -> None:
        self.skipped_steps += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"grad norm {grad_norm}"
        budget = self.cfg.training.skip_nonfinite_steps
        if self.skipped_steps > budget:
            raise NonFiniteError(
                f"non-finite {what} at step {self.step + 1}; stopping (skipped "
                f"{self.skipped_steps - 1} of --skip-nonfinite-steps {budget} so far)"
            )
        log.warning(
            f"step {self.step + 1}: non-finite {what}, update skipped "
            f"({self.skipped_steps}/{budget})"
        )

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Any, iters: int) -> float:
        """Mean validation loss over ``iters`` micro-batches per DP rank (fixed samples)."""
        for chunk in self.model:
            chunk.eval()
        iterators = self._iterators(dataset, 0)
        totals = self._forward_backward(iterators, iters, True, self.base_step)
        for chunk in self.model:
            chunk.train()
        return float(totals[METRICS.index("lm_loss")] / totals[-1].clamp(min=1))

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> list[StepResult]:
        """Train for --train-iters steps, logging every --log-interval; returns each step."""
        tr, lg = self.cfg.training, self.cfg.logging
        history: list[StepResult] = []
        window: list[StepResult] = []
        while self.step < tr.train_iters:
            with self.profiler.step(self.step):
                result = self.train_step()
            self.train_seconds += result.seconds
            self.tokens_seen += result.tokens
            history.append(result)
            window.append(result)
            if self.step % lg.log_interval == 0 or self.step == tr.train_iters:
                self._log(window)
                window = []
            if self._eval_due():
                self._log_eval()
            if self.after_step is not None and self.after_step():
                break
        return history

    def _eval_due(self) -> bool:
        """Validate every --eval-interval steps and once more at the last step (as Megatron-LM)."""
        tr = self.cfg.training
        if not tr.eval_interval or self.valid_ds is None:
            return False
        return self.step % tr.eval_interval == 0 or self.step == tr.train_iters

    def _log(self, window: list[StepResult]) -> None:
        last = window[-1]
        seconds = sum(r.seconds for r in window)
        tokens = sum(r.batch_size for r in window) * self.cfg.data.seq_length
        values = {"loss": last.loss}
        kd = kd_columns(window, gate=self.cfg.distill.kd_gate != "none")
        if kd:
            values |= kd | {"teacher_time_share": self.kd.take_teacher_seconds() / seconds}
        values |= {
            "lr": last.lr,
            "grad_norm": last.grad_norm,
            "tokens_per_s": tokens / seconds,
            "ms_per_step": 1000.0 * seconds / len(window),
            "elapsed_s": self.train_seconds,
        }
        if self.cfg.training.rampup_batch_size is not None:
            values["global_batch_size"] = last.batch_size
        if self.log_columns is not None:
            values |= self.log_columns(window)
        peak = metrics.peak_tflops()
        if peak is not None:
            tflops = self._flops_per_token * tokens / seconds / 1e12 / self.world_size
            values.update(tflops_per_gpu=tflops, mfu=tflops / peak)
        if self.cfg.logging.log_memory:
            values |= self._log_memory()
        moe = self.moe.collect() if self.moe is not None else {}
        short = {"load_balancing_loss": "moe_lb_loss", "load_max_over_mean": "moe_max_load",
                 "dropped": "moe_dropped"}  # fmt: skip
        values |= {name: moe[key] for key, name in short.items() if key in moe}
        self.writer.console(self.step, self.cfg.training.train_iters, values)
        self.writer.scalars(self.step, values, prefix="train/")
        if moe:
            self.writer.scalars(self.step, moe, prefix="moe/")

    def _log_memory(self) -> dict[str, float]:
        """Every rank's peak memory of the window to TensorBoard; the largest for the console."""
        ranks = metrics.gather_memory(metrics.peak_memory_mib())
        for rank, peaks in enumerate(ranks):
            self.writer.scalars(self.step, peaks, prefix=f"memory/rank{rank}/")
        return {name: max(r[name] for r in ranks) for name in ranks[0]}

    def _log_eval(self) -> None:
        loss = self.evaluate(self.valid_ds, self.eval_iters)
        ppl = math.exp(min(loss, 50.0))
        self.writer.console(
            self.step, self.cfg.training.train_iters, {"val_loss": loss, "val_ppl": ppl}
        )
        self.writer.scalars(self.step, {"loss": loss, "ppl": ppl}, prefix="valid/")

    def close(self) -> None:
        """Release the teacher if it is still held; write a pending trace; flush logs."""
        self.profiler.close()
        self.kd.close()
        self.writer.close()
