"""salt_megatron.checkpoint."""
