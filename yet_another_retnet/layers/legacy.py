"""The calling conventions of yet-another-retnet 0.5.1's ``MultiScaleRetention``, sorted into ours.

0.5.1 passed the position as an index (``forward_recurrent(q, k, v, seq_idx, prev_state)``,
``forward_chunkwise(q, k, v, start_idx, prev_state)``) next to a plain ``(batch, heads, dk, dv)``
tensor state, and ``need_weights`` as ``forward_parallel``'s fourth argument. Our layer's state is
a :class:`~yet_another_retnet.layers.retention.RetentionState` that carries its position. This
module only translates: an index call gets a ``RetentionState`` at that position built from the
plain tensor, and gets a plain tensor back; the layer itself computes the same either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.retention import compute_dtype

if TYPE_CHECKING:
    from .retention import MultiScaleRetention, RetentionState

#: 0.5.1's activation callables and the names our layer knows them by.
_CALLABLES: dict[Callable[..., Any], str] = {F.silu: "swish", F.gelu: "gelu", F.relu: "relu"}


def gate_activation_name(activation: object, gate_activation: str) -> str:
    """The gate activation from 0.5.1's ``activation`` (a name or ``F.silu``/``F.gelu``/
    ``F.relu``) and ours, ``gate_activation``; they must agree when both are given."""
    if activation is None:
        return gate_activation
    if isinstance(activation, str):
        name = activation
    elif activation in _CALLABLES:
        name = _CALLABLES[activation]
    elif isinstance(activation, torch.nn.SiLU | torch.nn.GELU | torch.nn.ReLU) and (
            not isinstance(activation, torch.nn.GELU) or activation.approximate == "none"):
        name = {torch.nn.SiLU: "swish", torch.nn.GELU: "gelu", torch.nn.ReLU: "relu"}[type(activation)]
    else:
        raise ValueError(
            "activation must be 'swish', 'gelu', 'relu' or one of F.silu / F.gelu / F.relu, got "
            f"{activation!r} (other callables are not supported: the fused kernels know these three)"
        )
    if gate_activation not in ("swish", name):
        raise ValueError(f"activation={name!r} and gate_activation={gate_activation!r} disagree; pass one")
    return name


def head_norm_eps(group_norm_eps: float | None, norm_eps: float) -> float:
    """0.5.1's ``group_norm_eps`` is our ``norm_eps``; they must agree when both are given."""
    if group_norm_eps is None:
        return norm_eps
    if norm_eps not in (1e-6, group_norm_eps):
        raise ValueError(f"group_norm_eps={group_norm_eps} and norm_eps={norm_eps} disagree; pass one")
    return float(group_norm_eps)


def is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sort_args(method: str, args: Sequence[Any], ours: Sequence[str], index_name: str,
              given: dict[str, Any]) -> dict[str, Any]:
    """Assign the positional ``args`` after ``(query, key, value)`` to parameter names.

    Ours are ``ours`` in order; an int first is 0.5.1's index, followed by its ``prev_state``.
    ``given`` holds the keyword arguments (``None`` where not passed); the result holds all.
    """
    names = (index_name, "prev_state") if args and is_index(args[0]) else tuple(ours)
    if len(args) > len(names):
        raise TypeError(f"{method}() takes at most {3 + len(names)} positional arguments after self, "
                        f"got {3 + len(args)}")
    out = dict(given)
    for name, value in zip(names, args, strict=False):
        if out.get(name) is not None:
            raise TypeError(f"{method}() got multiple values for argument {name!r}")
        out[name] = value
    return out


def state_at_index(layer: MultiScaleRetention, prev_state: object, index: object, index_name: str,
                   query: Tensor) -> RetentionState | None:
    """The ``RetentionState`` for a call at ``index`` (0.5.1's ``seq_idx`` / ``start_idx``).

    ``prev_state`` may be ``None``, a plain ``(batch, heads, dk, dv)`` tensor (0.5.1's state) or a
    ``RetentionState``, whose position must then equal ``index`` in every row.
    """
    from .retention import RetentionState

    if not is_index(index) or int(index) < 0:  # type: ignore[call-overload]
        raise ValueError(f"{index_name} must be an int >= 0, got {index!r}")
    position = int(index)  # type: ignore[call-overload]
    warnings.warn(
        f"{index_name}= and plain tensor states are yet-another-retnet 0.5.1's API: the state "
        "returned without an index is a RetentionState that carries its position "
        "(see docs/migrating-from-0.5.md)", DeprecationWarning, stacklevel=4)
    batch = query.shape[0]
    if isinstance(prev_state, RetentionState):
        layer.check_state(prev_state, batch)
        if bool((prev_state.position != position).any()):
            raise ValueError(
                f"{index_name}={position} disagrees with prev_state.position "
                f"{prev_state.position.tolist()}: pass one of them (a RetentionState knows its position)"
            )
        return prev_state
    rows = torch.full((batch,), position, dtype=torch.long, device=query.device)
    if prev_state is None:
        if position == 0:
            return None
        return RetentionState(layer.empty_state(batch, query.device, query.dtype).memory, rows)
    if not isinstance(prev_state, Tensor):
        raise TypeError(f"prev_state must be None, a tensor or a RetentionState, got {type(prev_state).__name__}")
    expected = (batch, layer.num_heads, layer.key_dim, layer.head_dim)
    if tuple(prev_state.shape) != expected:
        raise ValueError(f"prev_state must have shape (batch, heads, dk, dv) = {expected}, got {tuple(prev_state.shape)}")
    return RetentionState(prev_state.to(compute_dtype(query.dtype)), rows)


def plain_tensor_state_error(index_name: str) -> TypeError:
    return TypeError(
        f"prev_state is a plain tensor: pass {index_name}= with it (yet-another-retnet 0.5.1's form), "
        "or hand back the RetentionState the layer returned"
    )
