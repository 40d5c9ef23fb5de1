"""Full models: the RetNet language model, its configuration, checkpoints and weight import."""

from .config import PRESETS, RetNetConfig
from .retnet import (
    RetNet,
    RetNetDecoder,
    RetNetDecoderLayer,
    RetNetOutput,
    RetNetState,
    count_parameters,
)

__all__ = [
    "PRESETS",
    "RetNet",
    "RetNetConfig",
    "RetNetDecoder",
    "RetNetDecoderLayer",
    "RetNetOutput",
    "RetNetState",
    "count_parameters",
]
