"""One training job from a validated config, after torch.distributed is up."""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist

from salt_megatron.checkpoint.manager import Checkpointer
from salt_megatron.config.schema import SaltConfig
from salt_megatron.data.teacher_targets import TargetStore
from salt_megatron.training.data import build_run_data
from salt_megatron.training.logger import log
from salt_megatron.training.sft import SFTRun
from salt_megatron.training.trainer import Trainer


def _pretraining(cfg: SaltConfig, dp: int) -> tuple[Trainer, Any, Any]:
    """The pretraining (SALT) trainer, its checkpoint ``extra`` and its test split."""
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
    return trainer, lambda: trainer.kd.state(trainer.step), data.test


def run(cfg: SaltConfig) -> int:
    """Build data and the student, train, run the final test evaluation; returns an exit code.

    Under ``--sft`` the data are the packed SFT sets and the weights come from
    ``--pretrained-checkpoint`` unless ``--load`` resumes (:class:`SFTRun`); there is no test split.
    """
    dp = cfg.data_parallel_size(dist.get_world_size())
    sft = SFTRun(cfg, dp) if cfg.sft.sft else None
    if sft is not None:
        trainer = Trainer(
            sft.cfg,
            (sft.train, sft.valid),
            int(sft.tokenizer.vocab_size),
            tokenizer_fingerprint=sft.tokenizer.fingerprint,
            padded_vocab=sft.padded_vocab,
        )
        sft.install(trainer)
        extra, test = sft.state, None
    else:
        trainer, extra, test = _pretraining(cfg, dp)
    ckpt = Checkpointer(trainer, trainer.tokenizer_fingerprint, extra_fn=extra)
    try:
        step = ckpt.resume()
        if sft is not None:
            sft.start(trainer, step, ckpt.loaded_extra)
        else:
            trainer.kd.check_resume(trainer.step, ckpt.loaded_extra)
        trainer.after_step = ckpt.after_step
        trainer.train()
        ckpt.finish()
        if ckpt.stop_reason is None and test is not None and cfg.training.eval_interval:
            loss = trainer.evaluate(test, cfg.training.eval_iters)
            log.info(f"test loss {loss:.4f} | test ppl {math.exp(min(loss, 50.0)):.2f}")
    finally:
        ckpt.close()
        trainer.close()
    return 0
