"""salt-megatron: SALT (Small model Aided Large model Training) on megatron-core."""

__version__ = "0.1.0"
