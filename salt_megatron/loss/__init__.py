"""salt_megatron.loss: the fused vocab-parallel SALT (KD + CE) losses and their float64 references.

:func:`kd_cross_entropy` takes the teacher's dense logits shard; :func:`sparse_kd_cross_entropy`
takes stored sparse teacher targets (top-k / top-p ids and log-probabilities, residual mass).
"""

from salt_megatron.loss.common import KDStats
from salt_megatron.loss.gate import KDGate
from salt_megatron.loss.kd_cross_entropy import check_shard_widths, kd_cross_entropy
from salt_megatron.loss.reference import reference_kd_loss, reference_sparse_kd_loss
from salt_megatron.loss.sparse_kd import sparse_kd_cross_entropy

__all__ = [
    "KDGate",
    "KDStats",
    "check_shard_widths",
    "kd_cross_entropy",
    "reference_kd_loss",
    "reference_sparse_kd_loss",
    "sparse_kd_cross_entropy",
]
