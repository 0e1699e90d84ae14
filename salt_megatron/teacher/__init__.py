"""salt_megatron.teacher: the colocated frozen teacher (see ``docs/teacher.md``)."""

from salt_megatron.teacher.checks import TeacherError
from salt_megatron.teacher.head import PAD_LOGIT
from salt_megatron.teacher.teacher import Teacher

__all__ = ["PAD_LOGIT", "Teacher", "TeacherError"]
