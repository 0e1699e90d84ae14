"""Device/backend choice, torch.distributed set-up and teardown, and the CPU redirection layer."""

from salt_megatron.runtime.distributed import (
    backend,
    destroy_distributed,
    device,
    init_distributed,
)

__all__ = ["backend", "destroy_distributed", "device", "init_distributed"]
