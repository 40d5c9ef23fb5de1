"""yet-another-retnet 0.5.1's ``yet_another_retnet.retnet`` module path, kept for old code.

``from yet_another_retnet.retnet import RetNet`` gives 0.5.1's ``RetNet(num_tokens, d_model,
nhead, num_layers, ...)`` with its methods, plain tensor states and checkpoint keys, computed by
our model (:mod:`yet_another_retnet.compat.yar051`). New code: ``from yet_another_retnet import
RetNet, RetNetConfig`` (docs/migrating-from-0.5.md).
"""

from .compat.yar051 import (
    RetNet,
    RetNetDecoder,
    RetNetDecoderLayer,
    retnet_1_3b,
    retnet_2_7b,
    retnet_6_7b,
)

__all__ = ["RetNet", "RetNetDecoder", "RetNetDecoderLayer", "retnet_1_3b", "retnet_2_7b", "retnet_6_7b"]
