"""The fast routes of a retention layer, beside the reference they replace, and the one table
that picks among them.

:meth:`~yet_another_retnet.layers.retention.MultiScaleRetention.retain` computes every call with
the plain reference ops (``project``, :mod:`~yet_another_retnet.ops.retention`'s three forms,
``output``). With the layer's ``use_fast_path`` on (the default), :func:`pick_route` names the
route a multi-token call takes and :func:`run_route` runs it; every route gives the reference's
numbers to rounding (tests/ops/test_chunkwise_vs_reference.py, tests/cpu/test_retention_core.py,
tests/models/test_fast_decoding.py). The table, checked top to bottom (the first row whose conditions all
hold wins):

=========  =================================================================  ==========================
route      conditions                                                         what runs
=========  =================================================================  ==========================
reference  ``use_fast_path`` off; or cross-retention (key or value is not     ``project`` + the ops'
           the query); or ``"recurrent"`` mode; or a dtype other than         forms + ``output``
           float32/float64; or autocast on
compiled   ``"chunkwise"``; ``compile_chunkwise()`` on; length >= 1; a valid  :func:`fused_chunkwise`
           ``chunk_size``; a state in the input dtype; and not (its            through ``torch.compile``,
           ``keep_kernel_calls`` with CPU float32 and the kernels built)       one graph per layer call
core       ``"chunkwise"``; the paper's layer (group norm, swish gate); no    ``ops.retention_core``:
           padding; a float32 state or none; whole chunks; then the kernel's  split, rotation, retention,
           own :func:`~yet_another_retnet.ops.cpu.retention_core.supports`    head norm and gate in one
           on the projection (CPU float32, the extension built), else on to   kernel
           ``fused`` with the same product
fused      every other multi-token self-retention call                        one ``[q|k|v|g]`` product,
                                                                              split (and rotated) by the
                                                                              ``split_heads`` kernel on
                                                                              CPU float32, then the
                                                                              ops' forms + ``output``
=========  =================================================================  ==========================

Single-token decoding has its own fast step (:meth:`MultiScaleRetention.step`, driven by
:mod:`yet_another_retnet.models.decoding`); :func:`linear_step` and :func:`stack_linears` serve it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.cpu import _extension as cpu_extension
from ..ops.cpu._extension import autocast_enabled, is_compiling
from ..ops.cpu._extension import load as load_extension
from ..ops.cpu.gemv import gemv
from ..ops.cpu.matmul import linear
from ..ops.cpu.retention_core import retention_core
from ..ops.cpu.retention_core import supports as core_supports
from ..ops.cpu.split_heads import constant_table, split_heads
from ..ops.cpu.split_heads import supports as split_supports
from ..ops.decay import ChunkTables, chunk_tables, resolve_log_decay
from ..ops.norms import key_scale
from ..ops.position import (
    from_halves,
    half_tables,
    rotate_halves,
    rotate_heads,
    rotate_pairs,
    to_halves,
)
from ..ops.retention import chunkwise_table_shapes, chunkwise_with_tables

if TYPE_CHECKING:
    from .retention import MultiScaleRetention

#: Input dtypes of the fused multi-token routes (half inputs take the reference).
FAST_DTYPES = (torch.float32, torch.float64)

REFERENCE, COMPILED, CORE, FUSED = "reference", "compiled", "core", "fused"
ROUTES = (REFERENCE, COMPILED, CORE, FUSED)


class Finished(NamedTuple):
    """A route that ran the whole layer: ``y`` ``(b, L, embed_dim)`` (residual included) and the
    new memory ``(b, h, dk, dv)``."""

    y: Tensor
    memory: Tensor


class Heads(NamedTuple):
    """A route that made the heads: q, k ``(b, h, L, dk)`` (keys not yet scaled), v ``(b, h, L,
    dv)`` and the gate's pre-activation ``(b, L, value_dim)``; the reference forms go on from them."""

    q: Tensor
    k: Tensor
    v: Tensor
    gate: Tensor


def pick_route(layer: MultiScaleRetention, query: Tensor, key: Tensor, value: Tensor, memory: Tensor | None,
               mode: str, chunk_size: int | None, token_mask: Tensor | None) -> str:
    """The route of one :meth:`~MultiScaleRetention.retain` call (the module docstring's table).

    Inputs ``(batch, length, embed_dim)``; ``memory`` ``(batch, heads, dk, dv)`` or ``None``."""
    if not (layer.use_fast_path and mode != "recurrent" and key is query and value is query
            and query.dtype in FAST_DTYPES and not autocast_enabled(query.device.type)):
        return REFERENCE
    if mode != "chunkwise":
        return FUSED
    whole_chunks = chunk_size is None or (type(chunk_size) is int and chunk_size >= 1)
    if (compiled_form(layer, query) is not None and query.shape[1] > 0 and whole_chunks
            and (memory is None or memory.dtype == query.dtype)):
        return COMPILED
    if (token_mask is None and layer.head_norm == "groupnorm" and layer.norm_weight is not None
            and layer.norm_bias is not None and layer.gate_activation in ("swish", "silu") and whole_chunks
            and (memory is None or memory.dtype == torch.float32)):
        return CORE
    return FUSED


def compiled_form(layer: MultiScaleRetention, query: Tensor) -> Callable[..., Any] | None:
    """The layer's ``torch.compile``'d :func:`fused_chunkwise` (``RetNet.compile_chunkwise``), or
    ``None`` where there is none or it yields to the CPU kernels (``keep_kernel_calls``: those
    kernels and oneDNN's products beat the graph on CPU float32)."""
    compiled, keep_kernel_calls = layer.__dict__.get("_compiled_chunkwise", (None, False))
    if keep_kernel_calls and query.device.type == "cpu" and query.dtype == torch.float32 and load_extension():
        return None
    return compiled


def run_route(layer: MultiScaleRetention, route: str, x: Tensor, memory: Tensor | None, chunk_size: int | None,
              rotation: tuple[Tensor, Tensor] | None, token_mask: Tensor | None,
              residual: Tensor | None) -> Finished | Heads:
    """Run ``route`` (not the reference) for self-retention over ``x`` ``(b, L, embed_dim)``.

    ``rotation`` is the layer's ``(cos, sin)`` ``(b or 1, 1, L, dk)``; ``residual`` ``(b, L,
    embed_dim)`` is added to a finished output."""
    if route == COMPILED:
        y, new_memory = compiled_chunkwise(layer, x, memory, chunk_size, rotation, token_mask)
        return Finished(y if residual is None else residual + y, new_memory)
    proj = fused_projection(layer, x)
    if route == CORE:
        done = core_chunkwise(layer, proj, memory, chunk_size, rotation)
        if done is not None:
            return Finished(layer._project_out(done[0], residual), done[1])
    return Heads(*split_projection(layer, proj, rotation, token_mask))


# --------------------------------------------------------------------------------------------
# The routes
# --------------------------------------------------------------------------------------------


def fused_projection(layer: MultiScaleRetention, x: Tensor, halves: bool = False) -> Tensor:
    """``[q | k | v | gate]`` of ``x`` ``(b, L, embed_dim)`` in one matmul: ``(b, L, 2 d + 2
    value_dim)``, keys not yet scaled. The four weights are concatenated on each call (a 4 d x d
    copy, cheap next to the matmul) so autograd and the state dict keep seeing the four separate
    parameters. ``halves``: q's and k's features in :func:`~yet_another_retnet.ops.position.to_halves`
    order."""
    heads = layer.num_heads
    projs = (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj)

    # Reordering the (small) weight rows reorders the projection's output features for free.
    def rows(t: Tensor, i: int) -> Tensor:  # q's and k's rows in the halves order
        return to_halves(t, heads, dim=0) if halves and i < 2 else t

    weight = torch.cat([rows(p.weight, i) for i, p in enumerate(projs)])
    bias = torch.cat([rows(p.bias, i) for i, p in enumerate(projs)]) if layer.q_proj.bias is not None else None
    return linear(x, weight, bias)


def split_projection(
    layer: MultiScaleRetention, proj: Tensor, rotation: tuple[Tensor, Tensor] | None,
    token_mask: Tensor | None, halves: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:meth:`~MultiScaleRetention.project`'s heads, and the gate's pre-activation, from the fused
    product ``proj`` ``(b, L, 2 d + 2 value_dim)`` of :func:`fused_projection` (made with the same
    ``halves``).

    Returns q, k ``(b, h, L, dk)`` (keys not yet scaled), v ``(b, h, L, dv)``, gate ``(b, L,
    value_dim)``.

    ``halves`` (with a rotation): q and k come out with each head's key dimensions reordered, the
    even ones then the odd ones. Retention only ever sums over the key dimension, so its output is
    unchanged; a state it builds has its key axis in the same order. The rotation's pairs are then
    two contiguous halves, which a compiler vectorizes (interleaved pairs compile to scalar code on
    CPU); ``rotation`` is then :func:`~yet_another_retnet.ops.position.half_tables`' ``(cos, sin)``.
    """
    batch, length, _ = proj.shape
    heads, dk, dv, d = layer.num_heads, layer.key_dim, layer.head_dim, layer.embed_dim
    halves = halves and rotation is not None
    if not halves:
        # CPU float32: split, rotation and layout in one kernel pass (ops/cpu/split_heads.py), in a
        # compiled graph too.
        cos, sin = kernel_tables(rotation)
        if split_supports(proj, cos) and constant_table(sin) and cpu_extension.load():
            q, k, v, gate = split_heads(proj, cos, sin, heads, dk)
            k, v = drop_padding(k, v, token_mask)
            return q, k, v, gate
    # split, not slicing: its backward is one cat, where each slice's backward would fill a zero
    # tensor of the whole projection's size.
    qk, v, gate = proj.split([2 * d, layer.value_dim, layer.value_dim], dim=-1)
    if rotation is not None:
        # q and k rotated together, in one elementwise op forward and backward.
        cos, sin = rotation  # (b or 1, 1, L, dk)
        if halves:
            qk = rotate_halves(qk.unflatten(-1, (2 * heads, 2, dk // 2)), cos[:, :, None], sin[:, :, None]).flatten(-3)
        elif is_compiling():  # the same product in reals: inductor fuses these, not complex ops
            c, s = (t[:, 0, :, None, 0::2] for t in (cos, sin))
            qk = rotate_pairs(qk.unflatten(-1, (2 * heads, dk // 2, 2)), c, s).flatten(-3)
        else:
            qk = rotate_heads(qk, cos, sin)
    qk = qk.unflatten(-1, (2, heads, dk))
    q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # unbind: its backward is one stack
    v = v.view(batch, length, heads, dv).transpose(1, 2)
    k, v = drop_padding(k, v, token_mask)
    return q, k, v, gate


def core_chunkwise(
    layer: MultiScaleRetention, proj: Tensor, memory: Tensor | None, chunk_size: int | None,
    rotation: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor] | None:
    """Chunkwise retention from the fused product ``proj`` ``(b, L, 2 d + 2 value_dim)`` to the
    output projection's input ``(b, L, value_dim)``, plus the new memory, in one kernel call
    (``ops.retention_core``); ``None`` where the kernel declines (the length not a whole number of
    chunks, or the kernel's :func:`~yet_another_retnet.ops.cpu.retention_core.supports`)."""
    length = proj.shape[1]
    chunk = length if chunk_size is None else min(chunk_size, length)
    if length == 0 or length % chunk or layer.norm_weight is None or layer.norm_bias is None:
        return None
    cos, sin = kernel_tables(rotation)
    log_gamma = resolve_log_decay(layer.gammas, layer.num_heads, proj.device)
    tables = chunk_tables(log_gamma, chunk, 1, proj.dtype, key_scale(layer.key_dim))
    args = (tables.inner, tables.query_decay, tables.key_decay, tables.chunk_decay.view(layer.num_heads))
    if not (core_supports(proj, cos, layer.num_heads, layer.key_dim, chunk, *args) and constant_table(sin)
            and cpu_extension.load()):
        return None
    return retention_core(proj, cos, sin, *args, memory, layer.norm_weight, layer.norm_bias, layer.norm_eps,
                          layer.num_heads, layer.key_dim, chunk)


def compiled_chunkwise(
    layer: MultiScaleRetention, x: Tensor, memory: Tensor | None, chunk_size: int | None,
    rotation: tuple[Tensor, Tensor] | None, token_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The compiled form of :func:`fused_chunkwise` (``RetNet.compile_chunkwise``): projection,
    rotation, retention, head norm, gate and output in one graph; the decay tables (which it cannot
    trace) looked up here. Where the split kernel takes the projection (CPU float32) the graph calls
    it, as eager does (inductor's own split and rotation were slower there); elsewhere the rotation
    goes in halves, which inductor vectorizes. Returns ``(y (b, L, d), new memory)``."""
    compiled = compiled_form(layer, x)
    assert compiled is not None
    length = x.shape[1]
    chunk = length if chunk_size is None else min(chunk_size, length)
    log_gamma = resolve_log_decay(layer.gammas, layer.num_heads, x.device)
    tables = {shape: chunk_tables(log_gamma, *shape, x.dtype, key_scale(layer.key_dim))
              for shape in chunkwise_table_shapes(length, chunk)}
    halves = rotation is not None and not (split_supports(x, rotation[0]) and cpu_extension.load())
    tables_in = half_tables(*rotation) if halves and rotation is not None else rotation
    return cast(tuple[Tensor, Tensor], compiled(x, memory, chunk, tables_in, token_mask, tables, halves))


def fused_chunkwise(
    layer: MultiScaleRetention, x: Tensor, memory: Tensor | None, chunk: int,
    rotation: tuple[Tensor, Tensor] | None, token_mask: Tensor | None,
    tables: dict[tuple[int, int], ChunkTables], halves: bool,
) -> tuple[Tensor, Tensor]:
    """Chunkwise self-retention of ``x`` ``(b, L, d)`` through the fused projection, decay tables
    given: what ``compile_chunkwise`` compiles. ``rotation`` as from ``half_tables`` where
    ``halves`` (see :func:`split_projection`), else as for it. Returns ``(y (b, L, d), new memory)``."""
    halves = halves and rotation is not None
    q, k, v, gate = split_projection(layer, fused_projection(layer, x, halves), rotation, token_mask, halves)
    if halves and memory is not None:  # the state's key axis in q's and k's order
        memory = to_halves(memory, 1, dim=-2)
    retained, new_memory = chunkwise_with_tables(q, k, v, memory, chunk, lambda c, n: tables[(c, n)])
    if halves:
        new_memory = from_halves(new_memory, 1, dim=-2)
    return layer.output(retained, x, gate), new_memory


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


def kernel_tables(rotation: tuple[Tensor, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    """The layer's ``(cos, sin)`` ``(b or 1, 1, L, dk)`` as the CPU kernels take them, ``(b or 1,
    L, dk)``; ``(None, None)`` for no rotation."""
    return (None, None) if rotation is None else (rotation[0][:, 0], rotation[1][:, 0])


def drop_padding(k: Tensor, v: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Zero the keys and values ``(b, h, L, d)`` of padded tokens so padding never reaches a state.

    ``torch.where``, not a multiply, so a NaN computed at a padded position cannot leak through
    ``0 * NaN``.
    """
    if token_mask is None:
        return k, v
    keep = token_mask[:, None, :, None]
    zero_k = torch.zeros((), dtype=k.dtype, device=k.device)
    zero_v = torch.zeros((), dtype=v.dtype, device=v.device)
    return torch.where(keep, k, zero_k), torch.where(keep, v, zero_v)


# --------------------------------------------------------------------------------------------
# The decoding step's products
# --------------------------------------------------------------------------------------------


def stack_linears(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """The weights ``(sum out, in)`` (and biases) of ``linears`` stacked along the output dim: a
    detached copy, so one matrix-vector product replaces several in a decoding step."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return weight, bias


def weight_version(p: Tensor) -> tuple[int, int]:
    """``(storage pointer, in-place version)`` of a weight: what a copy made of it is checked by.

    Two in-place edits leave both the same, so the check cannot see them; call
    ``RetNet.release_decode_cache`` after either: an edit through ``.data`` (``p.data.copy_(w)``:
    ``.data`` is a tensor of its own, with its own counter), and any edit of a tensor made under
    ``torch.inference_mode`` (such tensors keep no counter and count as unchanged while their
    storage is the same). ``with torch.no_grad(): p.copy_(w)``, ``load_state_dict`` and ``.to()``
    are seen.
    """
    return p.data_ptr(), (0 if p.is_inference() else p._version)


def linear_step(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias) + residual`` for the few rows of a decoding step.

    ``x`` ``(batch, in)`` -> ``(batch, out)``; ``residual`` ``(batch, out)`` or ``None``. One row goes
    through :func:`~yet_another_retnet.ops.gemv.gemv` (the residual and bias added by it): the
    decoding kernel, or ``torch.mv``/``torch.addmv`` where it is unavailable (both read the weights
    faster than the oneDNN matmul ``F.linear`` picks for a (1, in) input).
    """
    if x.shape[0] != 1:
        out = F.linear(x, weight, bias)
        return out if residual is None else out + residual
    add = residual[0] if residual is not None else None
    if bias is not None:
        add = bias if add is None else add + bias
    return gemv(weight, x[0], add).unsqueeze(0)
