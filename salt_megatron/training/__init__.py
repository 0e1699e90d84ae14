"""salt_megatron.training."""
