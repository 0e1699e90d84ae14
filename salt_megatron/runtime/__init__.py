"""Device/backend choice, torch.distributed set-up and teardown, and the CPU redirection layer."""

from salt_megatron.runtime.distributed import (
    backend,
    device,
    destroy_distributed,
    init_distributed,
)

__all__ = ["backend", "device", "destroy_distributed", "init_distributed"]
