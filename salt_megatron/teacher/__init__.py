"""salt_megatron.teacher."""
