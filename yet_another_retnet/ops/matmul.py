"""The previous import path of :mod:`yet_another_retnet.ops.cpu.matmul`: this name is that module
(the same object, so its state and anything patched on it are shared); new code imports it there."""

import sys

from .cpu import matmul as _module
from .cpu.matmul import *  # noqa: F403  (the public names, for type checkers)
from .cpu.matmul import BACKENDS as BACKENDS
from .cpu.matmul import ENV as ENV

sys.modules[__name__] = _module
