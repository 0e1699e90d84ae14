"""The trainer's checkpoint policy: resume, periodic saves, early exit, the final save.

``run.py`` builds one :class:`Checkpointer` per job, calls :meth:`Checkpointer.resume` before
training, installs :meth:`Checkpointer.after_step` as the trainer's per-step hook and calls
:meth:`Checkpointer.finish` at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from salt_megatron.checkpoint import files, trainer_state
from salt_megatron.runtime.signals import StopConditions

log = logging.getLogger("salt_megatron")


class Checkpointer:
    """Saves and restores one trainer according to the ``checkpoint`` and ``training`` configs.

    ``extra_fn`` returns a JSON-able dict stored in each checkpoint's ``salt_meta.json`` under
    ``extra`` (e.g. the KD phase); :attr:`loaded_extra` is the one read back by :meth:`resume`.
    """

    def __init__(
        self,
        trainer: Any,
        tokenizer_fingerprint: str,
        extra_fn: Callable[[], dict[str, Any]] | None = None,
        install_signal: bool = True,
    ) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg.checkpoint
        self.fingerprint = tokenizer_fingerprint
        self.extra_fn = extra_fn
        self.stop = StopConditions(trainer.cfg.training, self.cfg, install_signal=install_signal)
        self.last_saved: int | None = None
        self.loaded_extra: dict[str, Any] = {}
        self.stop_reason: str | None = None

    def resume(self) -> int | None:
        """Load the latest checkpoint under ``--load`` if there is one; returns its step."""
        if not self.cfg.load:
            return None
        resolved = files.resolve(self.cfg.load, self.cfg.fallback_to_previous)
        if resolved is None:
            log.info(f"no checkpoint in --load {self.cfg.load}: starting from step 0")
            return None
        meta = trainer_state.load(self.trainer, resolved, self.fingerprint)
        self.loaded_extra = dict(meta.get("extra") or {})
        self.last_saved = resolved.step if self.cfg.load == self.cfg.save else None
        log.info(
            f"resumed from {resolved.path}: step {resolved.step}, "
            f"{self.trainer.consumed_samples} samples consumed, "
            f"{self.trainer.skipped_steps} skipped steps"
        )
        return resolved.step

    def save(self) -> None:
        """Save now (every rank); no-op without ``--save``."""
        if not self.cfg.save:
            return
        extra = self.extra_fn() if self.extra_fn is not None else {}
        path = trainer_state.save(
            self.trainer, self.cfg.save, self.cfg.keep_last, self.fingerprint, extra
        )
        self.last_saved = self.trainer.step
        log.info(f"saved checkpoint {path}")

    def after_step(self) -> bool:
        """Periodic save, then the stop checks (collective); True when training must stop."""
        step = self.trainer.step
        if self.cfg.save_interval and step % self.cfg.save_interval == 0:
            self.save()
        reason = self.stop.check(step)
        if reason is None:
            return False
        self.stop_reason = reason
        if self.last_saved != step:
            self.save()
        where = f"checkpoint at step {step} in {self.cfg.save}" if self.cfg.save else "no --save"
        log.info(f"exiting early: {reason}; {where}")
        return True

    def finish(self) -> None:
        """The save at the end of training (skipped when this step is already saved)."""
        if self.last_saved != self.trainer.step:
            self.save()

    def close(self) -> None:
        """Restore the signal handler."""
        self.stop.close()
