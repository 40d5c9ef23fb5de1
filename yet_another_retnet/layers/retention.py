"""Multi-scale retention (MSR): the attention replacement of RetNet, as an ``nn.Module``.

``MSR(X) = (swish(X W_G) * HeadNorm(Retention(X W_Q, X W_K, X W_V))) W_O``, with one decay rate
per head and queries/keys rotated by their absolute position.

A layer's state is a :class:`RetentionState`: the ``(batch, heads, dk, dv)`` memory and each row's
position, so a caller never passes an index and any form can continue where another stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.decay import DECAY_SCHEDULES, decay_gammas, resolve_log_decay
from ..ops.position import apply_rotation, rotation_tables
from ..ops.retention import (
    compute_dtype,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
    state_update,
)

HEAD_NORMS = ("groupnorm", "rmsnorm")
GATE_ACTIVATIONS = {"swish": F.silu, "silu": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": None}


@dataclass
class RetentionState:
    """What one retention layer carries from one call to the next.

    Attributes:
        memory: ``(batch, heads, dk, dv)`` retention state, float32 (float64 for float64 models).
        position: ``(batch,)`` int64, the absolute position of each row's next token.
    """

    memory: Tensor
    position: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.memory.shape[0])


def positions_for(
    start: Tensor, length: int, token_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Absolute positions ``(batch, length)`` of new tokens and each row's next start ``(batch,)``.

    ``start`` ``(batch,)`` holds each row's next position. With a ``token_mask`` ``(batch, length)``
    (True for real tokens), padding takes no position: a row's real tokens count from ``start``.
    """
    if token_mask is None:
        steps = torch.arange(length, device=start.device)
        return start[:, None] + steps, start + length
    counts = token_mask.long().cumsum(dim=1)
    return start[:, None] + (counts - 1).clamp(min=0), start + counts[:, -1]


def _check_input(name: str, x: object, rank: int, embed_dim: int) -> Tensor:
    layout = "(batch, length, embed_dim)" if rank == 3 else "(batch, embed_dim)"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != rank or x.shape[-1] != embed_dim:
        raise ValueError(f"{name} must have shape {layout} with embed_dim={embed_dim}, got {tuple(x.shape)}")
    return x


class MultiScaleRetention(nn.Module):
    """Multi-scale retention with gate, per-head norm and output projection.

    Args:
        embed_dim: model width ``d``; queries and keys are ``d`` wide (key head dim ``d / heads``).
        num_heads: number of heads, each with its own decay rate.
        value_factor: value width as a multiple of ``embed_dim`` (paper: 2).
        bias: biases on the projections.
        dropout: dropout on the output.
        gate_activation: ``"swish"`` (paper), ``"gelu"``, ``"relu"`` or ``"identity"``.
        head_norm: ``"groupnorm"`` (paper: per-head LayerNorm with affine) or ``"rmsnorm"``
            (torchscale: per-head RMSNorm without affine).
        norm_eps: epsilon of the head norm.
        relative_position: rotate queries and keys by position (xPos/RoPE-like).
        decay: ``"eq8"`` (default), ``"log-spaced"`` or a ``(num_heads,)`` tensor of gammas.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        value_factor: float = 2.0,
        bias: bool = False,
        dropout: float = 0.0,
        gate_activation: str = "swish",
        head_norm: str = "groupnorm",
        norm_eps: float = 1e-6,
        relative_position: bool = True,
        decay: str | Tensor = "eq8",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        value_dim = round(embed_dim * value_factor)
        if value_factor <= 0 or value_dim != embed_dim * value_factor or value_dim % num_heads:
            raise ValueError(
                f"value_factor ({value_factor}) must make embed_dim * value_factor an integer "
                f"divisible by num_heads ({num_heads})"
            )
        self.key_dim = embed_dim // num_heads
        if relative_position and self.key_dim % 2:
            raise ValueError(
                f"the key head dim embed_dim / num_heads = {self.key_dim} must be even with relative_position=True"
            )
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {sorted(GATE_ACTIVATIONS)}, got {gate_activation!r}")
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {HEAD_NORMS}, got {head_norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps}")
        if isinstance(decay, str) and decay not in DECAY_SCHEDULES:
            raise ValueError(f"decay must be one of {DECAY_SCHEDULES} or a tensor, got {decay!r}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.value_dim = value_dim
        self.head_dim = value_dim // num_heads
        self.dropout = dropout
        self.gate_activation = gate_activation
        self.head_norm = head_norm
        self.norm_eps = norm_eps
        self.relative_position = relative_position

        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, value_dim, bias=bias, **kw)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=bias, **kw)
        if head_norm == "groupnorm":
            self.norm_weight: nn.Parameter | None = nn.Parameter(torch.ones(value_dim, **kw))
            self.norm_bias: nn.Parameter | None = nn.Parameter(torch.zeros(value_dim, **kw))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        gammas = decay if isinstance(decay, Tensor) else decay_gammas(num_heads, decay)
        if gammas.shape != (num_heads,):
            raise ValueError(f"decay must have shape ({num_heads},), got {tuple(gammas.shape)}")
        # Kept in float64 and out of the state dict: it is configuration, not a weight, and a
        # model cast to bfloat16 must not round gamma = 1 - 2^-12 to 1.
        self.gammas: Tensor
        self.register_buffer("gammas", gammas.detach().to(torch.float64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm_weight is not None and self.norm_bias is not None:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)

    def _apply(self, fn: Any, recurse: bool = True) -> MultiScaleRetention:
        # .to(device) moves the decay buffer, but no cast may change its float64 dtype: rebuild it
        # from the float64 original on whatever device the cast left it.
        gammas = self.gammas
        super()._apply(fn, recurse)
        self.gammas = gammas.to(device=self.gammas.device)
        return self

    # ----------------------------------------------------------------------------------------
    # State helpers
    # ----------------------------------------------------------------------------------------

    def empty_state(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> RetentionState:
        """A zero state at position 0; ``dtype`` is the model's dtype (state kept in float32+)."""
        ref = self.q_proj.weight
        device = ref.device if device is None else device
        ct = compute_dtype(ref.dtype if dtype is None else dtype)
        memory = torch.zeros(batch_size, self.num_heads, self.key_dim, self.head_dim, dtype=ct, device=device)
        return RetentionState(memory, torch.zeros(batch_size, dtype=torch.long, device=device))

    def check_state(self, state: object, batch_size: int, name: str = "prev_state") -> RetentionState:
        if not isinstance(state, RetentionState):
            raise TypeError(f"{name} must be a RetentionState (or None), got {type(state).__name__}")
        expected = (batch_size, self.num_heads, self.key_dim, self.head_dim)
        if tuple(state.memory.shape) != expected:
            raise ValueError(
                f"{name}.memory must have shape (batch, heads, dk, dv) = {expected}, got {tuple(state.memory.shape)}"
            )
        if tuple(state.position.shape) != (batch_size,):
            raise ValueError(f"{name}.position must have shape ({batch_size},), got {tuple(state.position.shape)}")
        return state

    # ----------------------------------------------------------------------------------------
    # The shared pieces of every form
    # ----------------------------------------------------------------------------------------

    def rotation(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` of shape ``(batch, 1, length, dk)`` for ``positions`` ``(batch, length)``."""
        if not self.relative_position:
            return None
        cos, sin = rotation_tables(positions, self.key_dim, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def project(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        rotation: tuple[Tensor, Tensor] | None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Heads from inputs ``(batch, length, embed_dim)``: q, k ``(b, h, L, dk)``, v ``(b, h, L, dv)``."""
        batch, length, _ = query.shape
        q = self.q_proj(query).view(batch, length, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, length, self.num_heads, self.key_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if rotation is not None:
            cos, sin = rotation
            # Under autocast the projections come out in half precision while the tables follow
            # the (float32) hidden states: rotate in the wider type, keep the projections' dtype.
            q = apply_rotation(q, cos, sin).to(v.dtype)
            k = apply_rotation(k, cos, sin).to(v.dtype)
        if token_mask is not None:
            # Padding must not reach the state: zero its keys and values (where, not multiply, so a
            # NaN computed at a padded position cannot leak through 0 * NaN).
            keep = token_mask[:, None, :, None]
            k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
        return q, k, v

    def output(self, retained: Tensor, query: Tensor) -> Tensor:
        """Head norm, gate and output projection: retained ``(b, h, L, dv)`` -> ``(b, L, embed_dim)``."""
        batch, _, length, _ = retained.shape
        y = retained.transpose(1, 2)  # (b, L, h, dv)
        # The norm runs in float32 for half inputs, in float64 for float64 ones (.float() would
        # silently drop a float64 layer to float32 precision).
        nt = compute_dtype(y.dtype)
        if self.head_norm == "groupnorm":
            y = F.layer_norm(y.to(nt), (self.head_dim,), eps=self.norm_eps).to(query.dtype)
            y = y.reshape(batch, length, self.value_dim)
            assert self.norm_weight is not None and self.norm_bias is not None
            y = y * self.norm_weight + self.norm_bias
        else:
            yf = y.to(nt)
            y = (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + self.norm_eps)).to(query.dtype)
            y = y.reshape(batch, length, self.value_dim)
        gate = self.g_proj(query)
        act = GATE_ACTIVATIONS[self.gate_activation]
        if act is not None:
            gate = act(gate)
        out = self.out_proj(gate * y)
        return F.dropout(out, p=self.dropout, training=self.training)

    def retain(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        state: RetentionState | None,
        mode: str,
        chunk_size: int | None = None,
        rotation: tuple[Tensor, Tensor] | None = None,
        token_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, RetentionState, Tensor | None]:
        """One call of the layer in ``mode`` (``"parallel"``, ``"chunkwise"`` or ``"recurrent"``).

        Inputs are ``(batch, length, embed_dim)`` (``recurrent`` steps through the length token by
        token). ``rotation`` may be precomputed by the caller for this call's positions (a model
        shares it across layers); ``token_mask`` ``(batch, length)`` marks real tokens (left
        padding only, and only with an empty state).

        Returns ``(y, state, weights)``: every mode returns the state after the last token;
        ``weights`` only in parallel mode with ``need_weights``.
        """
        batch, length, _ = query.shape
        start = state.position if state is not None else torch.zeros(batch, dtype=torch.long, device=query.device)
        positions, next_position = positions_for(start, length, token_mask)
        if rotation is None:
            rotation = self.rotation(positions, query.dtype)
        q, k, v = self.project(query, key, value, rotation, token_mask)
        memory = state.memory if state is not None else None
        weights = None
        if mode == "parallel":
            retained, weights = retention_parallel(
                q, k, v, decay=self.gammas, prev_state=memory, need_weights=need_weights
            )
            new_memory = _final_state(k, v, memory, self.gammas)
        elif mode == "chunkwise":
            retained, new_memory = retention_chunkwise(q, k, v, memory, chunk_size, decay=self.gammas)
        elif mode == "recurrent":
            steps = []
            running = memory
            for t in range(length):
                out_t, running = retention_recurrent(
                    q[:, :, t], k[:, :, t], v[:, :, t], running, decay=self.gammas
                )
                steps.append(out_t)
            # A zero-length input leaves the state as it was (or empty).
            new_memory = running if running is not None else self.empty_state(batch, query.device, query.dtype).memory
            retained = torch.stack(steps, dim=2) if steps else v
        else:
            raise ValueError(f"mode must be 'parallel', 'chunkwise' or 'recurrent', got {mode!r}")
        y = self.output(retained, query)
        return y, RetentionState(new_memory, next_position), weights

    # ----------------------------------------------------------------------------------------
    # Public forms
    # ----------------------------------------------------------------------------------------

    def _checked(self, query: Tensor, key: Tensor, value: Tensor, rank: int,
                 prev_state: RetentionState | None) -> None:
        for name, x in (("query", query), ("key", key), ("value", value)):
            _check_input(name, x, rank, self.embed_dim)
        if key.shape != query.shape or value.shape != query.shape:
            raise ValueError(
                f"query, key and value must have one shape, got {tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}"
            )
        if prev_state is not None:
            self.check_state(prev_state, query.shape[0])

    def forward_parallel(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        prev_state: RetentionState | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Parallel form: inputs ``(batch, length, embed_dim)`` -> ``(y, weights_or_None)``.

        ``weights`` ``(batch, heads, length, length)`` are the decayed retention scores.
        """
        self._checked(query, key, value, 3, prev_state)
        y, _, weights = self.retain(query, key, value, prev_state, "parallel", need_weights=need_weights)
        return y, weights

    def forward_recurrent(
        self, query: Tensor, key: Tensor, value: Tensor, prev_state: RetentionState | None = None
    ) -> tuple[Tensor, RetentionState]:
        """One token: inputs ``(batch, embed_dim)`` -> ``(y (batch, embed_dim), state)``."""
        self._checked(query, key, value, 2, prev_state)
        y, state, _ = self.retain(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), prev_state, "recurrent"
        )
        assert state is not None
        return y.squeeze(1), state

    def forward_chunkwise(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        prev_state: RetentionState | None = None,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, RetentionState]:
        """Chunkwise form: inputs ``(batch, length, embed_dim)`` -> ``(y, state)``."""
        self._checked(query, key, value, 3, prev_state)
        y, state, _ = self.retain(query, key, value, prev_state, "chunkwise", chunk_size=chunk_size)
        assert state is not None
        return y, state

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        prev_state: RetentionState | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The parallel form; ``key`` and ``value`` default to ``query`` (self-retention)."""
        key = query if key is None else key
        value = query if value is None else value
        return self.forward_parallel(query, key, value, prev_state, need_weights)


def _final_state(k: Tensor, v: Tensor, memory: Tensor | None, gammas: Tensor) -> Tensor:
    """The state after a parallel call, the same formula the chunkwise form uses."""
    ct = compute_dtype(k.dtype)
    log_gamma = resolve_log_decay(gammas, k.shape[1], k.device)
    return state_update(k.to(ct) * k.shape[-1] ** -0.5, v.to(ct), memory, log_gamma)


#: The name used in the original yet-another-retnet README.
MultiheadRetention = MultiScaleRetention
