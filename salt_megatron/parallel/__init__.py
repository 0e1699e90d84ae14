"""salt_megatron.parallel."""
