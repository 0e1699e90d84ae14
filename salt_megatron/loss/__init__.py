"""salt_megatron.loss: the fused vocab-parallel SALT (KD + CE) loss and its float64 reference."""

from salt_megatron.loss.kd_cross_entropy import KDStats, check_shard_widths, kd_cross_entropy
from salt_megatron.loss.reference import reference_kd_loss

__all__ = ["KDStats", "check_shard_widths", "kd_cross_entropy", "reference_kd_loss"]
