"""Weights & Biases runs (Megatron-LM's ``--wandb-project/--wandb-exp-name/--wandb-save-dir``).

``wandb`` is an optional extra (``pip install 'salt-megatron[wandb]'``). Every rank calls
:func:`require_wandb` before the student is built, so a missing package stops every rank with the
same clear error (``pretrain_salt.py`` exit code 5) instead of leaving the others waiting in a
collective; only the logging rank calls :func:`start_wandb`. Each (re)start of a job is its own
W&B run under the same name.
"""

from __future__ import annotations

import os
from typing import Any

from salt_megatron.config.cli import to_dict
from salt_megatron.config.schema import ConfigError, LoggingConfig, SaltConfig

EXTRA_HINT = "pip install 'salt-megatron[wandb]'"


def require_wandb(logging: LoggingConfig) -> None:
    """Raise :class:`ConfigError` if --wandb-project is set and ``wandb`` cannot be imported."""
    if not logging.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--wandb-project {logging.wandb_project} needs the wandb package, which is not "
            f"installed: {EXTRA_HINT} ({exc})"
        ) from exc


def wandb_dir(cfg: SaltConfig) -> str | None:
    """Where the run's local files go: --wandb-save-dir, else ``<--save>/wandb``, else wandb's
    default (``./wandb``)."""
    if cfg.logging.wandb_save_dir:
        return cfg.logging.wandb_save_dir
    return os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save else None


def start_wandb(cfg: SaltConfig) -> Any:
    """Start the W&B run (logging rank only) with the whole config tree as its config."""
    import wandb

    directory = wandb_dir(cfg)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.wandb_exp_name,
        dir=directory,
        config=to_dict(cfg),
    )
