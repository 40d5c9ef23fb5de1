"""The previous import path of :mod:`yet_another_retnet.ops.cpu.quantized`: this name is that module
(the same object, so its state and anything patched on it are shared); new code imports it there."""

import sys

from .cpu import quantized as _module
from .cpu.quantized import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
