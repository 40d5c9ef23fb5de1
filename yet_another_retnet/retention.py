"""The retention API under the module path of the original yet-another-retnet README.

``from yet_another_retnet.retention import MultiheadRetention, retention_parallel`` keeps working;
the code lives in :mod:`yet_another_retnet.ops` (math) and :mod:`yet_another_retnet.layers`.
"""

from .layers.retention import MultiheadRetention, MultiScaleRetention, RetentionState
from .ops.retention import retention_chunkwise, retention_parallel, retention_recurrent

__all__ = [
    "MultiScaleRetention",
    "MultiheadRetention",
    "RetentionState",
    "retention_chunkwise",
    "retention_parallel",
    "retention_recurrent",
]
