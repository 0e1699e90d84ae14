"""salt_megatron.distill."""
