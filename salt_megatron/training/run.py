"""One training job from a validated config, after torch.distributed is up."""

from __future__ import annotations

import math

import torch.distributed as dist

from salt_megatron.checkpoint.manager import Checkpointer
from salt_megatron.config.schema import SaltConfig
from salt_megatron.data.teacher_targets import TargetStore
from salt_megatron.training.data import build_run_data
from salt_megatron.training.logger import log
from salt_megatron.training.trainer import Trainer


def run(cfg: SaltConfig) -> int:
    """Build data and the student, train, run the final test evaluation; returns an exit code."""
    dp = cfg.data_parallel_size(dist.get_world_size())
    data = build_run_data(cfg, dp)
    kd_train = targets = None
    if cfg.distill.enabled and cfg.distill.kd_data_path:
        kd_train = build_run_data(cfg, dp, blend=cfg.distill.kd_data_path).train
    if cfg.distill.enabled and cfg.distill.kd_targets:
        targets = TargetStore(cfg.distill.kd_targets)
    trainer = Trainer(
        cfg,
        (data.train, data.valid),
        data.vocab_size,
        kd_train=kd_train,
        tokenizer_fingerprint=data.tokenizer.fingerprint,
        kd_targets=targets,
    )
    ckpt = Checkpointer(
        trainer, data.tokenizer.fingerprint, extra_fn=lambda: trainer.kd.state(trainer.step)
    )
    try:
        ckpt.resume()
        trainer.kd.check_resume(trainer.step, ckpt.loaded_extra)
        trainer.after_step = ckpt.after_step
        trainer.train()
        ckpt.finish()
        if ckpt.stop_reason is None and data.test is not None and cfg.training.eval_interval:
            loss = trainer.evaluate(data.test, cfg.training.eval_iters)
            log.info(f"test loss {loss:.4f} | test ppl {math.exp(min(loss, 50.0)):.2f}")
    finally:
        ckpt.close()
        trainer.close()
    return 0
