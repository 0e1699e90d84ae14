"""salt_megatron.models."""
