"""Multi-scale retention (MSR): the attention replacement of RetNet, as an ``nn.Module``.

``MSR(X) = (swish(X W_G) * HeadNorm(Retention(X W_Q, X W_K, X W_V))) W_O``, with one decay rate
per head and queries/keys rotated by their absolute position. Read top to bottom:

1. :class:`RetentionState` - what a layer carries between calls (memory and position);
2. :class:`MultiScaleRetention` - projections (:meth:`~MultiScaleRetention.project`), rotation
   (:meth:`~MultiScaleRetention.rotation`), decay (``gammas``), the three forms and the gate, head
   norm and output (:meth:`~MultiScaleRetention.output`), all in :meth:`~MultiScaleRetention.retain`;
3. the public forms (``forward_parallel`` / ``forward_chunkwise`` / ``forward_recurrent``);
4. the single-token decoding step (:meth:`~MultiScaleRetention.step`).

``retain`` runs the plain reference ops of :mod:`yet_another_retnet.ops`; with ``use_fast_path``
on, a multi-token call may take a fused route instead, picked by one table in
:mod:`yet_another_retnet.layers.fast` (same numbers, fewer passes over memory).

A layer's state is a :class:`RetentionState`: the ``(batch, heads, dk, dv)`` memory and each row's
position, so a caller never passes an index and any form can continue where another stopped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.cpu._extension import autocast_enabled as _autocast_enabled
from ..ops.cpu._extension import is_compiling as _is_compiling
from ..ops.cpu.decode_step import retention_step, retention_step_reference
from ..ops.cpu.matmul import linear
from ..ops.cpu.norm_gate import head_group_norm, norm_gate
from ..ops.decay import DECAY_SCHEDULES, ChunkTables, decay_gammas, resolve_log_decay
from ..ops.norms import key_scale, rms_normalize
from ..ops.position import (
    ROTATIONS,
    apply_rotation,
    rotate_heads,
    rotation_factor_table,
    rotation_factors,
    rotation_tables,
    rotation_tables_from_zero,
)
from ..ops.retention import (
    compute_dtype,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
    state_update,
)
from ..ops.segments import check_reset_mask, pack, segment_layout, unpack
from . import fast, legacy
from .fast import FAST_DTYPES as _FAST_DTYPES
from .fast import drop_padding as _drop_padding
from .fast import linear_step, stack_linears, weight_version

__all__ = ["GATE_ACTIVATIONS", "HEAD_NORMS", "MultiScaleRetention", "MultiheadRetention", "RetentionState",
           "linear_step", "positions_for", "stacked_weights", "weight_version"]

HEAD_NORMS = ("groupnorm", "rmsnorm")
GATE_ACTIVATIONS = {"swish": F.silu, "silu": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": None}
#: Positions kept in a decoding rotation table (beyond it, rows are computed per step).
_MAX_ROTATION_TABLE = 1 << 16


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
        dropout: dropout on the output.
        relative_position: rotate queries and keys by position (xPos/RoPE-like).
        bias: biases on the projections.
        batch_first, activation, group_norm_eps: yet-another-retnet 0.5.1's names, accepted in
            its positional order: ``batch_first`` must be True; ``activation`` is
            ``gate_activation`` (a name or ``F.silu`` / ``F.gelu`` / ``F.relu``),
            ``group_norm_eps`` is ``norm_eps``.
        value_factor: value width as a multiple of ``embed_dim`` (paper: 2). Keyword-only, as
            are the options below.
        gate_activation: ``"swish"`` (paper), ``"gelu"``, ``"relu"`` or ``"identity"``.
        head_norm: ``"groupnorm"`` (paper: per-head LayerNorm with affine) or ``"rmsnorm"``
            (torchscale: per-head RMSNorm without affine).
        norm_eps: epsilon of the head norm.
        decay: ``"eq8"`` (default), ``"log-spaced"`` or a ``(num_heads,)`` tensor of gammas.
        rotation: ``"xpos"`` (torchscale's frequencies) or ``"rope"`` (GPT-NeoX/fla's, float32);
            see :mod:`yet_another_retnet.ops.position`.
        head_norm_weight: with ``head_norm="rmsnorm"``, a learned weight ``(dv,)`` shared by all
            heads on the normalised output (fla's RetNet).
        use_fast_path: let multi-token calls take the fused routes of
            :mod:`~yet_another_retnet.layers.fast` (``False``: the plain reference ops only).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        relative_position: bool = True,
        bias: bool = False,
        batch_first: bool = True,
        activation: str | Callable[[Tensor], Tensor] | None = None,
        group_norm_eps: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        value_factor: float = 2.0,
        gate_activation: str = "swish",
        head_norm: str = "groupnorm",
        norm_eps: float = 1e-6,
        decay: str | Tensor = "eq8",
        rotation: str = "xpos",
        head_norm_weight: bool = False,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        # The positional order and ``batch_first`` / ``activation`` / ``group_norm_eps`` are those
        # of yet-another-retnet 0.5.1 (layers/legacy.py); our options are keyword-only.
        if not batch_first:
            raise NotImplementedError("batch_first=False is not supported: inputs are (batch, length, embed_dim)")
        gate_activation = legacy.gate_activation_name(activation, gate_activation)
        norm_eps = legacy.head_norm_eps(group_norm_eps, norm_eps)
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
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if head_norm_weight and head_norm != "rmsnorm":
            raise ValueError(f"head_norm_weight needs head_norm='rmsnorm', got head_norm={head_norm!r}")
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
        self.rotation_kind = rotation

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
        # fla's head norm: one weight (dv,) for every head (none in torchscale's).
        self.head_weight: nn.Parameter | None = (
            nn.Parameter(torch.ones(self.head_dim, **kw)) if head_norm_weight else None)
        gammas = decay if isinstance(decay, Tensor) else decay_gammas(num_heads, decay)
        if gammas.shape != (num_heads,):
            raise ValueError(f"decay must have shape ({num_heads},), got {tuple(gammas.shape)}")
        if isinstance(decay, Tensor) and gammas.device.type != "meta":
            resolve_log_decay(gammas, num_heads, gammas.device)  # NaN, out of (0, 1], or trainable: refused
        # Kept in float64 and out of the state dict: it is configuration, not a weight, and a
        # model cast to bfloat16 must not round gamma = 1 - 2^-12 to 1.
        self.gammas: Tensor
        self.register_buffer("gammas", gammas.detach().to(torch.float64), persistent=False)
        self.use_fast_path = use_fast_path
        self.reset_parameters()

    #: Let multi-token calls take the fused routes (training, prefill); ``False`` runs the plain
    #: reference ops. (A class default too, for layers pickled before the switch existed.)
    use_fast_path: bool = True

    @property
    def fast_path(self) -> bool:
        """Deprecated name of :attr:`use_fast_path` (the same switch)."""
        warnings.warn("MultiScaleRetention.fast_path is deprecated: use use_fast_path", DeprecationWarning,
                      stacklevel=2)
        return self.use_fast_path

    @fast_path.setter
    def fast_path(self, enabled: bool) -> None:
        warnings.warn("MultiScaleRetention.fast_path is deprecated: use use_fast_path", DeprecationWarning,
                      stacklevel=3)
        self.use_fast_path = enabled

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
        if self.head_weight is not None:
            nn.init.ones_(self.head_weight)

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
        ref = self.weight_like()
        device = ref.device if device is None else device
        ct = compute_dtype(ref.dtype if dtype is None else dtype)
        memory = torch.zeros(batch_size, self.num_heads, self.key_dim, self.head_dim, dtype=ct, device=device)
        return RetentionState(memory, torch.zeros(batch_size, dtype=torch.long, device=device))

    def check_state(self, state: object, batch_size: int, name: str = "prev_state",
                    check_position: bool = True) -> RetentionState:
        """``state`` if it fits this layer and ``batch_size`` rows, else an error naming ``name``:
        the memory's shape, its dtype (the compute dtype of the layer's weights: another one would
        make each form return a different dtype) and its device; the positions' shape, dtype and
        sign (a negative one would index the rotation table from its end). ``check_position``:
        False where the caller checked the positions, which every layer shares, once."""
        if not isinstance(state, RetentionState):
            raise TypeError(f"{name} must be a RetentionState (or None), got {type(state).__name__}")
        self.check_memory(state.memory, batch_size, f"{name}.memory")
        if check_position:
            check_positions(state.position, batch_size, f"{name}.position")
        return state

    def weight_like(self) -> Tensor:
        """A tensor in the dtype of the layer's weights and on their device, without touching a
        quantized projection's ``weight`` (a property that dequantizes it): its ``float_like``."""
        like = self.q_proj._buffers.get("float_like")
        return like if like is not None else self.q_proj.weight

    def check_memory(self, memory: Tensor, batch_size: int, name: str) -> None:
        expected = (batch_size, self.num_heads, self.key_dim, self.head_dim)
        if tuple(memory.shape) != expected:
            raise ValueError(f"{name} must have shape (batch, heads, dk, dv) = {expected}, got {tuple(memory.shape)}")
        ref = self.weight_like()
        if memory.dtype != compute_dtype(ref.dtype):
            raise TypeError(f"{name} must be {compute_dtype(ref.dtype)} (the state dtype of this model), "
                            f"got {memory.dtype}")
        if memory.device != ref.device and "meta" not in (memory.device.type, ref.device.type):
            raise ValueError(f"{name} is on {memory.device}, the model on {ref.device}")

    # ----------------------------------------------------------------------------------------
    # The shared pieces of every form
    # ----------------------------------------------------------------------------------------

    def rotation(self, positions: Tensor, dtype: torch.dtype,
                 from_zero: bool = False) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` of shape ``(batch, 1, length, dk)`` for ``positions`` ``(batch, length)``.

        ``from_zero``: the caller knows every row's positions are ``0 .. length - 1`` (no state, no
        padding); then one cached table ``(1, 1, length, dk)`` serves every row.
        """
        if not self.relative_position:
            return None
        if from_zero:
            cos, sin = rotation_tables_from_zero(positions.shape[-1], self.key_dim, dtype, positions.device,
                                                 self.rotation_kind)
            return cos[None, None], sin[None, None]
        cos, sin = rotation_tables(positions, self.key_dim, dtype, self.rotation_kind)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _positions(
        self,
        x: Tensor,
        start: Tensor | None,
        token_mask: Tensor | None = None,
        rotation: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[tuple[Tensor, Tensor] | None, Tensor]:
        """``(rotation, next_position)`` for a call on ``x`` ``(batch, length, ...)`` whose rows
        start at ``start`` ``(batch,)`` (``None``: a sequence's first call, at 0): the
        :meth:`rotation` tables of the new tokens' positions (``rotation`` itself if the caller
        has them already) and each row's position after them."""
        batch, length = x.shape[:2]
        first = start is None
        if start is None:
            start = torch.zeros(batch, dtype=torch.long, device=x.device)
        positions, next_position = positions_for(start, length, token_mask)
        if rotation is None:
            rotation = self.rotation(positions, x.dtype, from_zero=first and token_mask is None)
        return rotation, next_position

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
        k, v = _drop_padding(k, v, token_mask)
        return q, k, v

    def output(self, retained: Tensor, query: Tensor, gate: Tensor | None = None,
               residual: Tensor | None = None) -> Tensor:
        """Head norm, gate and output projection: retained ``(b, h, L, dv)`` -> ``(b, L, embed_dim)``.

        ``gate`` ``(b, L, value_dim)``, if given, is ``g_proj(query)`` already computed (before the
        activation) by the fused projection. ``residual`` ``(b, L, embed_dim)``, if given, is added
        to the output (inside the output product where it can: ``ops.matmul.linear``).
        """
        if gate is None:
            gate = self.g_proj(query)
        act = GATE_ACTIVATIONS[self.gate_activation]
        if self.head_norm == "groupnorm":
            assert self.norm_weight is not None and self.norm_bias is not None
            if act is F.silu:  # the paper's layer: one kernel on CPU float32 (ops/cpu/norm_gate.py)
                return self._project_out(
                    norm_gate(retained, gate, self.norm_weight, self.norm_bias, self.norm_eps, query.dtype), residual)
            y = head_group_norm(retained, self.norm_weight, self.norm_bias, self.norm_eps, query.dtype)
        else:
            batch, _, length, _ = retained.shape
            # float32 for half inputs, float64 for float64 ones (.float() would round float64)
            yf = retained.transpose(1, 2).to(compute_dtype(retained.dtype))  # (b, L, h, dv)
            y = rms_normalize(yf, self.norm_eps).to(query.dtype)
            if self.head_weight is not None:
                y = y * self.head_weight
            y = y.reshape(batch, length, self.value_dim)
        if act is not None:
            gate = act(gate)
        return self._project_out(gate * y, residual)

    def _project_out(self, y: Tensor, residual: Tensor | None) -> Tensor:
        """The output projection, its dropout, and ``residual`` added if given."""
        if self.dropout > 0.0 and self.training:
            out = F.dropout(self.out_proj(y), p=self.dropout, training=True)
            return out if residual is None else residual + out
        return linear(y, self.out_proj.weight, self.out_proj.bias, residual)

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
        residual: Tensor | None = None,
        reset_mask: Tensor | None = None,
    ) -> tuple[Tensor, RetentionState, Tensor | None]:
        """One call of the layer in ``mode`` (``"parallel"``, ``"chunkwise"`` or ``"recurrent"``).

        Inputs are ``(batch, length, embed_dim)`` (``recurrent`` steps through the length token by
        token). ``rotation`` may be precomputed by the caller for this call's positions (a model
        shares it across layers); ``token_mask`` ``(batch, length)`` marks real tokens (left
        padding only, and only with an empty state).

        Returns ``(y, state, weights)``: every mode returns the state after the last token;
        ``weights`` only in parallel mode with ``need_weights``. With ``residual`` ``(batch,
        length, embed_dim)``, ``y`` is ``residual`` plus the layer's output (a block's skip
        connection, added inside the output product where it can).

        ``reset_mask`` ``(batch, length)`` bool (self-retention, no state, no padding): True where a
        packed document starts; each document then runs alone, its state and positions starting
        afresh (laid out one per row by :mod:`~yet_another_retnet.ops.segments`); the state
        returned is each row's last document's.
        """
        if reset_mask is not None:
            return self._retain_documents(query, key, value, state, mode, chunk_size, token_mask, need_weights,
                                          residual, reset_mask)
        batch = query.shape[0]
        rotation, next_position = self._positions(query, None if state is None else state.position, token_mask,
                                                 rotation)
        memory = state.memory if state is not None else None
        # The one dispatch: a fused route (layers/fast.py) where its conditions hold, else the reference.
        route = fast.pick_route(self, query, key, value, memory, mode, chunk_size, token_mask)
        gate = None
        if route == fast.REFERENCE:
            q, k, v = self.project(query, key, value, rotation, token_mask)
        else:
            done = fast.run_route(self, route, query, memory, chunk_size, rotation, token_mask, residual)
            if isinstance(done, fast.Finished):
                return done.y, RetentionState(done.memory, next_position), None
            q, k, v, gate = done
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
            # unbind, not q[:, :, t]: one backward op for all steps instead of one full-size
            # gradient per step (quadratic in length).
            for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), strict=True):
                out_t, running = retention_recurrent(q_t, k_t, v_t, running, decay=self.gammas)
                steps.append(out_t)
            # A zero-length input leaves the state as it was (a copy: the caller may step the new
            # one in place and still hold the old), or empty.
            if running is None:
                new_memory = self.empty_state(batch, query.device, query.dtype).memory
            else:
                new_memory = running.clone() if running is memory else running
            retained = torch.stack(steps, dim=2) if steps else v
        else:
            raise ValueError(f"mode must be 'parallel', 'chunkwise' or 'recurrent', got {mode!r}")
        y = self.output(retained, query, gate, residual)
        return y, RetentionState(new_memory, next_position), weights

    def _retain_documents(
        self, query: Tensor, key: Tensor, value: Tensor, state: RetentionState | None, mode: str,
        chunk_size: int | None, token_mask: Tensor | None, need_weights: bool, residual: Tensor | None,
        reset_mask: Tensor,
    ) -> tuple[Tensor, RetentionState, Tensor | None]:
        if key is not query or value is not query:
            raise ValueError("reset_mask: packed documents need self-retention (key and value are the query)")
        if state is not None or token_mask is not None or need_weights:
            raise ValueError("reset_mask: packed documents start from an empty state, without padding or weights")
        batch, length, _ = query.shape
        seg = segment_layout(check_reset_mask(reset_mask.to(query.device), (batch, length)))
        packed = pack(query, seg)
        y, new, _ = self.retain(packed, packed, packed, None, mode, chunk_size,
                                token_mask=seg.valid if seg.padded else None)
        y = unpack(y, seg, batch, length)
        y = y if residual is None else residual + y
        return y, RetentionState(new.memory[seg.last], seg.lengths[seg.last]), None

    def absorb(
        self,
        x: Tensor,
        state: RetentionState | None,
        rotation: tuple[Tensor, Tensor] | None = None,
        token_mask: Tensor | None = None,
    ) -> RetentionState:
        """The state after self-retention over ``x`` ``(batch, length, embed_dim)``, without its
        outputs.

        What a layer needs of tokens whose outputs nobody reads (the earlier positions of a prompt
        in a model's last layer): only keys and values are projected, and the state is one
        decay-weighted ``K^T V`` (the formula every form's state comes from), so the query and
        gate projections, the retention of each position, the head norm and the output
        projection are all skipped. ``rotation`` and ``token_mask`` as for :meth:`retain`.
        """
        batch, length, _ = x.shape
        rotation, next_position = self._positions(x, None if state is None else state.position, token_mask, rotation)
        # Keys and values in one product, as in the fused route's projection.
        bias = None if self.k_proj.bias is None else torch.cat([self.k_proj.bias, self.v_proj.bias])
        k, v = linear(x, torch.cat([self.k_proj.weight, self.v_proj.weight]), bias).split(
            [self.embed_dim, self.value_dim], dim=-1)
        if rotation is not None and k.dtype in _FAST_DTYPES:
            k = rotate_heads(k, *rotation)
        elif rotation is not None:  # half precision has no complex type here
            heads = k.unflatten(-1, (self.num_heads, self.key_dim)).transpose(1, 2)
            k = apply_rotation(heads, *rotation).transpose(1, 2).to(v.dtype)
        k = k.reshape(batch, length, self.num_heads, self.key_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = _drop_padding(k, v, token_mask)
        memory = _final_state(k, v, state.memory if state is not None else None, self.gammas)
        return RetentionState(memory, next_position)

    # ----------------------------------------------------------------------------------------
    # Public forms
    # ----------------------------------------------------------------------------------------

    def _checked(self, query: Tensor, key: Tensor, value: Tensor, rank: int,
                 prev_state: RetentionState | None) -> None:
        for name, x in (("query", query), ("key", key), ("value", value)):
            _check_input(name, x, rank, self.embed_dim)
        weight = self.weight_like()
        if query.device.type == "meta" or weight.device.type == "meta":
            raise ValueError("query or the layer's weights are meta tensors (shapes without data): nothing to compute")
        if query.dtype != weight.dtype and not _autocast_enabled(query.device.type):
            raise TypeError(f"query has dtype {query.dtype} but the layer's weights are {weight.dtype}: "
                            f"cast the input or the layer (.to(dtype))")
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

        ``weights`` ``(batch, heads, length, length)`` are the decayed retention scores. A bool
        fourth argument is ``need_weights`` (yet-another-retnet 0.5.1's order).
        """
        if isinstance(prev_state, bool):
            prev_state, need_weights = None, need_weights or prev_state
        self._checked(query, key, value, 3, prev_state)
        y, _, weights = self.retain(query, key, value, prev_state, "parallel", need_weights=need_weights)
        return y, weights

    def forward_recurrent(
        self, query: Tensor, key: Tensor, value: Tensor, *args: Any,
        prev_state: RetentionState | Tensor | None = None, seq_idx: int | None = None,
    ) -> tuple[Tensor, Any]:
        """One token: inputs ``(batch, embed_dim)`` -> ``(y (batch, embed_dim), state)``.

        ``forward_recurrent(q, k, v, prev_state)``: ``prev_state`` is ``None`` or the
        :class:`RetentionState` a previous call returned, which knows its position.
        yet-another-retnet 0.5.1's ``forward_recurrent(q, k, v, seq_idx, prev_state)`` (also by
        keyword) takes and returns a plain ``(batch, heads, dk, dv)`` tensor state at position
        ``seq_idx`` (a ``RetentionState`` elsewhere than ``seq_idx`` is a ``ValueError``).
        """
        call = legacy.sort_args("forward_recurrent", args, ("prev_state",), "seq_idx",
                                {"prev_state": prev_state, "seq_idx": seq_idx})
        state = self._legacy_state(call["prev_state"], call["seq_idx"], "seq_idx", query)
        self._checked(query, key, value, 2, state)
        y, new_state, _ = self.retain(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), state, "recurrent"
        )
        assert new_state is not None
        return y.squeeze(1), new_state if call["seq_idx"] is None else new_state.memory

    def forward_chunkwise(
        self, query: Tensor, key: Tensor, value: Tensor, *args: Any,
        prev_state: RetentionState | Tensor | None = None, chunk_size: int | None = None,
        start_idx: int | None = None,
    ) -> tuple[Tensor, Any]:
        """Chunkwise form: inputs ``(batch, length, embed_dim)`` -> ``(y, state)``.

        ``forward_chunkwise(q, k, v, prev_state, chunk_size)`` returns a :class:`RetentionState`.
        yet-another-retnet 0.5.1's ``forward_chunkwise(q, k, v, start_idx, prev_state)`` (also by
        keyword) takes and returns a plain tensor state, as :meth:`forward_recurrent` does.
        """
        call = legacy.sort_args("forward_chunkwise", args, ("prev_state", "chunk_size"), "start_idx",
                                {"prev_state": prev_state, "chunk_size": chunk_size, "start_idx": start_idx})
        state = self._legacy_state(call["prev_state"], call["start_idx"], "start_idx", query)
        self._checked(query, key, value, 3, state)
        y, new_state, _ = self.retain(query, key, value, state, "chunkwise", chunk_size=call["chunk_size"])
        assert new_state is not None
        return y, new_state if call["start_idx"] is None else new_state.memory

    def _legacy_state(self, prev_state: object, index: object, index_name: str,
                      query: Tensor) -> RetentionState | None:
        """The state of a call, given its (0.5.1-style) index or not (layers/legacy.py)."""
        if index is not None:
            return legacy.state_at_index(self, prev_state, index, index_name, query)
        if isinstance(prev_state, Tensor):
            raise legacy.plain_tensor_state_error(index_name)
        return prev_state  # type: ignore[return-value]  # checked by _checked

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


    # ----------------------------------------------------------------------------------------
    # Single-token decoding (inference only; `retain(..., "recurrent")` is the reference)
    # ----------------------------------------------------------------------------------------

    def decode_tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(w, b, gamma)`` for :meth:`step`, made afresh on each call.

        ``w`` ``(2 d + 2 dv, d)`` stacks the q, k, v and g projections (``b`` their biases) so one
        matrix-vector product replaces four; ``gamma`` ``(heads, 1, 1)`` is the decay in the compute
        dtype. A model keeps them in its decoding plan (:mod:`yet_another_retnet.models.decoding`),
        outside the state dict, for as long as the weights they copy stay unchanged.
        """
        weight, bias = stack_linears((self.q_proj, self.k_proj, self.v_proj, self.g_proj))
        with torch.inference_mode(False):
            gamma = self.gammas.to(dtype).view(-1, 1, 1)
        return weight, bias, gamma

    def head_norm_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """The head norm's ``(weight, bias)`` over all heads, ``(h dv,)`` each, as the decoding
        kernels take them: the group norm's, or the shared RMS weight repeated for every head (a
        copy), or ``(None, None)``."""
        if self.head_weight is None:
            return self.norm_weight, self.norm_bias
        with torch.inference_mode(False), torch.no_grad():
            return self.head_weight.repeat(self.num_heads), None

    def step_rotation(self, position: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Rotation factors for one new token per row at ``position`` ``(batch,)``.

        Returns complex ``(batch, 2, 1, dk / 2)`` in the complex type of the compute ``dtype``:
        ``e^{i pos theta}`` for the query and the same times the key scale for the key
        (:func:`~yet_another_retnet.ops.position.rotation_factors`), read from a table of positions
        built once (no trigonometry per step).
        """
        if not self.relative_position:
            return None
        top = int(position.max()) if position.numel() else 0  # no rows: any table will do
        size = max(1024, 1 << top.bit_length())
        if size > _MAX_ROTATION_TABLE:  # far positions: compute just these rows
            return rotation_factors(position, self.key_dim, dtype, self.rotation_kind)[:, :, None]
        table = rotation_factor_table(size, self.key_dim, dtype, position.device, self.rotation_kind)
        return table[position][:, :, None]

    def step(self, x: Tensor, memory: Tensor, rotation: Tensor | None,
             residual: Tensor | None = None,
             tables: tuple[Tensor, Tensor | None, Tensor] | None = None,
             in_place: bool = False) -> tuple[Tensor, Tensor]:
        """One token through the layer, inference only: the fast form of ``retain(..., "recurrent")``.

        Args:
            x: ``(batch, embed_dim)`` input (already normed by the caller).
            memory: ``(batch, heads, dk, dv)`` state in the compute dtype; not modified.
            rotation: :meth:`step_rotation` at this token's positions (``None`` without rotation),
                or its ``torch.view_as_real`` (inductor fuses real arithmetic, not complex).
            residual: ``(batch, embed_dim)`` added to the output inside the output projection's
                matrix-vector product (saves the caller's separate add).
            tables: :meth:`decode_tables` for ``memory.dtype`` (made here when ``None``; a model
                passes those of its decoding plan).
            in_place: the new memory may be written over ``memory`` (where the CUDA step kernel
                runs; see :func:`~yet_another_retnet.ops.cpu.decode_step.retention_step`).

        Returns ``(y (batch, embed_dim), new_memory)``, ``y`` including ``residual``. No autograd (the
        fused weights are a detached copy) and no dropout: callers use it only in eval mode with
        grad disabled.
        """
        weight, bias, gamma = tables if tables is not None else self.decode_tables(memory.dtype)
        proj = linear_step(x, weight, bias)
        # Under torch.compile the PyTorch form (inductor fuses it); eager, one kernel call.
        if _is_compiling():
            y, new_memory = retention_step_reference(proj, memory, rotation, gamma, *self.head_norm_affine(),
                                                     self.norm_eps, self.head_norm == "rmsnorm",
                                                     GATE_ACTIVATIONS[self.gate_activation])
        else:
            y, new_memory = retention_step(proj, memory, rotation, gamma, *self.head_norm_affine(), self.norm_eps,
                                           self.head_norm == "rmsnorm", GATE_ACTIVATIONS[self.gate_activation],
                                           in_place)
        return linear_step(y, self.out_proj.weight, self.out_proj.bias, residual), new_memory

    def _fused_chunkwise(
        self, x: Tensor, memory: Tensor | None, chunk: int, rotation: tuple[Tensor, Tensor] | None,
        token_mask: Tensor | None, tables: dict[tuple[int, int], ChunkTables], halves: bool,
    ) -> tuple[Tensor, Tensor]:
        """What ``RetNet.compile_chunkwise`` compiles, one bound method per layer (the graph reads
        the layer's weights as ``self``): :func:`~yet_another_retnet.layers.fast.fused_chunkwise`."""
        return fast.fused_chunkwise(self, x, memory, chunk, rotation, token_mask, tables, halves)


def _final_state(k: Tensor, v: Tensor, memory: Tensor | None, gammas: Tensor) -> Tensor:
    """The state after a parallel call ``(b, h, dk, dv)`` from keys ``(b, h, L, dk)`` and values
    ``(b, h, L, dv)``: the same formula the chunkwise form uses."""
    ct = compute_dtype(k.dtype)
    log_gamma = resolve_log_decay(gammas, k.shape[1], k.device)
    return state_update(k.to(ct), v.to(ct), memory, log_gamma, key_scale(k.shape[-1]))


def stacked_weights(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
    """The weights (and biases) of ``linears`` stacked along the output dim. Kept for old callers:
    ``owner`` is no longer used (nothing is cached on it; see
    :func:`~yet_another_retnet.layers.fast.stack_linears`)."""
    return stack_linears(linears)


#: The name used in the original yet-another-retnet README.
MultiheadRetention = MultiScaleRetention


def check_positions(position: Tensor, batch_size: int, name: str) -> None:
    """A state's positions: ``(batch,)`` integers, none negative; an error naming ``name``."""
    if tuple(position.shape) != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(position.shape)}")
    if position.is_floating_point() or position.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {position.dtype}")
    if position.device.type != "meta" and position.numel() and bool((position < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {position.tolist()}")

