"""The math of retention: functional ops, decay schedules and position rotation."""

from .decay import DECAY_SCHEDULES, decay_gammas
from .retention import retention_chunkwise, retention_parallel, retention_recurrent

__all__ = [
    "DECAY_SCHEDULES",
    "decay_gammas",
    "retention_chunkwise",
    "retention_parallel",
    "retention_recurrent",
]
