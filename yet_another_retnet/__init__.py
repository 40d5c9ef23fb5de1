"""yet-another-retnet: Retentive Networks for PyTorch.

- :mod:`yet_another_retnet.ops`: retention in its parallel, recurrent and chunkwise forms.
- :mod:`yet_another_retnet.layers`: ``MultiScaleRetention`` and the block's norms and FFN.
- :mod:`yet_another_retnet.models`: ``RetNetConfig``, ``RetNet``, checkpoints, torchscale import.
- :mod:`yet_another_retnet.generation`: prefill + recurrent decoding, sampling.
- :mod:`yet_another_retnet.training`, :mod:`yet_another_retnet.bench`, :mod:`yet_another_retnet.cli`.
"""

from .layers.retention import MultiheadRetention, MultiScaleRetention, RetentionState
from .models import (
    PRESETS,
    RetNet,
    RetNetConfig,
    RetNetDecoder,
    RetNetDecoderLayer,
    RetNetOutput,
    RetNetState,
)
from .ops import (
    DECAY_SCHEDULES,
    decay_gammas,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)

__version__ = "0.6.0"

__all__ = [
    "DECAY_SCHEDULES",
    "PRESETS",
    "MultiScaleRetention",
    "MultiheadRetention",
    "RetNet",
    "RetNetConfig",
    "RetNetDecoder",
    "RetNetDecoderLayer",
    "RetNetOutput",
    "RetNetState",
    "RetentionState",
    "__version__",
    "decay_gammas",
    "retention_chunkwise",
    "retention_parallel",
    "retention_recurrent",
]
