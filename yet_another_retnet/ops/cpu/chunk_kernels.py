"""The per-chunk products of chunkwise retention as CPU kernels (``csrc/chunk_kernels.cpp``).

For every chunk of ``c`` tokens (``M`` the head's decay mask with the key scale folded in, ``kd``
and ``qd`` its per-row decay factors, ``B`` the state before the chunk)::

    contributions   R = (K * kd)^T V                        what the chunk adds to the state
    output          O = ((Q K^T) * M) V + (Q * qd) B         inside the chunk plus the past

and, as one op, the whole chunkwise core of a layer (:func:`chunk_retention`): both products and
the scan over the chunks' states between them (``B_{i+1} = d B_i + R_i``, ``d = gamma^c``), forward
and backward, a chunk's rows read once while in cache and the two ops' gradients summed in registers.

On CPU float32 (chunk, dk and dv multiples of 32) the kernels work one chunk at a time: they skip
the tiles above the causal diagonal, keep each chunk's scores in cache and recompute them in the
backward. Inputs may have any strides with a contiguous last dim (rows that are not contiguous are
copied per chunk, which costs: the caller passes contiguous tensors); outputs are contiguous.

Reference: :func:`chunk_contributions_reference`, :func:`chunk_output_reference` and
:func:`chunk_retention_reference`, the same in PyTorch ops: the path everywhere else (other
devices or dtypes, other sizes, tables that need a gradient, no C++ toolchain, torch < 2.4,
``YARETNET_FAST_PATH=0``), what a double backward (``create_graph=True``) differentiates (the
kernels' own backwards record no graph), and what ``tests/cpu/test_chunk_kernels.py`` checks the
kernels against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _extension

__all__ = [
    "chunk_contributions",
    "chunk_contributions_reference",
    "chunk_kernels_apply",
    "chunk_output",
    "chunk_output_reference",
    "chunk_retention",
    "chunk_retention_applies",
    "chunk_retention_reference",
    "supports",
    "supports_chunk_retention",
]

#: The kernels' tile width: chunk size, dk and dv must be multiples of it.
_TILE = 32


def shapes_fit(chunk: int, key_dim: int, value_dim: int, *tables: Tensor) -> bool:
    """Whether the kernels' tiles fit these sizes (``chunk``, ``key_dim`` and the per-head
    ``value_dim`` multiples of 32) and the decay tables are float32 constants. Pure."""
    return (chunk % _TILE == 0 and key_dim % _TILE == 0 and value_dim % _TILE == 0
            and all(t.dtype == torch.float32 and not t.requires_grad for t in tables))


def supports(q: Tensor, v: Tensor, *tables: Tensor) -> bool:
    """Whether the per-chunk kernels (:func:`chunk_contributions`, :func:`chunk_output`) take these
    inputs: CPU float32 ``(batch, heads, chunks, c, d)`` with ``c``, ``dk``, ``dv`` multiples of
    32, constant tables, torch >= 2.4, the kernels not ruled out. Pure: never builds the extension."""
    return (q.device.type == "cpu" and q.dtype == v.dtype == torch.float32 and q.dim() == 5
            and shapes_fit(q.shape[-2], q.shape[-1], v.shape[-1], *tables)
            and _extension.HAS_REGISTER_AUTOGRAD and _extension.usable())


def chunk_contributions_reference(k: Tensor, v: Tensor, key_decay: Tensor) -> Tensor:
    """``(k * key_decay)^T @ v`` per chunk: the plain form of :func:`chunk_contributions`."""
    return (k * key_decay).transpose(-1, -2) @ v


def chunk_output_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor,
                           befores: Tensor | None) -> Tensor:
    """``((q @ k^T) * mask) @ v + (q * query_decay) @ befores``: the plain form of :func:`chunk_output`."""
    out = ((q @ k.transpose(-1, -2)) * mask) @ v
    if befores is None:
        return out
    # The add fused into the batched product.
    c, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    return torch.baddbmm(out.reshape(-1, c, dv), (q * query_decay).reshape(-1, c, dk),
                         befores.reshape(-1, dk, dv)).view(out.shape)


def chunk_contributions(k: Tensor, v: Tensor, key_decay: Tensor) -> Tensor:
    """What each chunk adds to the state, differentiable in ``k`` and ``v``.

    Args:
        k: ``(batch, heads, chunks, c, dk)``; v: ``(batch, heads, chunks, c, dv)``; any strides.
        key_decay: ``(heads, 1, c, 1)``, row ``j``'s weight in its chunk's state.

    Returns:
        ``(batch, heads, chunks, dk, dv)``. The kernel where :func:`supports`, else
        :func:`chunk_contributions_reference`.
    """
    if supports(k, v, key_decay) and _extension.load():
        return torch.ops.yaretnet.chunk_contributions(k, v, key_decay)
    return chunk_contributions_reference(k, v, key_decay)


def chunk_output(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor,
                 befores: Tensor | None) -> Tensor:
    """Each chunk's output: its own tokens through the decay mask plus the state before it.

    Args:
        q, k: ``(batch, heads, chunks, c, dk)``; v: ``(batch, heads, chunks, c, dv)``; any strides.
        mask: ``(heads, 1, c, c)``, zero above the diagonal (the kernel never computes the tiles
            there). query_decay: ``(heads, 1, c, 1)``.
        befores: ``(batch, heads, chunks, dk, dv)`` the state before each chunk, or ``None`` (none).

    Returns:
        ``(batch, heads, chunks, c, dv)``, differentiable in ``q``, ``k``, ``v`` and ``befores``.
        The kernel where :func:`supports`, else :func:`chunk_output_reference`.
    """
    if (supports(q, v, mask, query_decay) and (befores is None or befores.dtype == torch.float32)
            and _extension.load()):
        return torch.ops.yaretnet.chunk_output(q, k, v, mask, query_decay, befores)
    return chunk_output_reference(q, k, v, mask, query_decay, befores)


def chunk_retention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor,
                              key_decay: Tensor, chunk_decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`chunk_retention` in plain PyTorch: the contributions, a loop over the chunks for the
    states before each, then the outputs. Returns ``(out, final)``."""
    contributions = chunk_contributions_reference(k, v, key_decay)  # (b, h, n, dk, dv)
    decay = chunk_decay.view(-1, 1, 1)
    state = torch.zeros_like(contributions[:, :, 0]) if prev is None else prev
    befores = []
    for added in contributions.unbind(2):
        befores.append(state)
        state = decay * state + added
    return chunk_output_reference(q, k, v, mask, query_decay, torch.stack(befores, dim=2)), state


#: The thread count the last eager call saw: what a graph being traced reads (below).
_threads_seen = torch.get_num_threads()


def _threads() -> int:
    """``torch.get_num_threads()``; while ``torch.compile`` traces, the count the last eager call
    saw, a module global (dynamo cannot put an int-valued torch call in a graph: it would break
    the graph there, in every layer). Dynamo guards on the global, so a graph traced at one count
    is traced again once an eager call sees another. (``torch.compiler.assume_constant_result``
    did the same, but as a decorator it imported all of dynamo with this package: +0.9 s and ~70
    MiB at import.)"""
    global _threads_seen
    if not _extension.is_compiling():
        _threads_seen = torch.get_num_threads()
    return _threads_seen


def supports_chunk_retention(q: Tensor, v: Tensor, *tables: Tensor) -> bool:
    """Whether :func:`chunk_retention` takes the kernel for these inputs: where :func:`supports`,
    and the ``batch * heads`` sequences (the op's only parallelism: it walks each one's chunks in
    order) spread evenly over the threads (:func:`walks_spread`). Otherwise the three separate
    ops, which also split the work by chunk, keep every thread busy. Pure."""
    return walks_spread(q.shape[0] * q.shape[1]) and supports(q, v, *tables)


def walks_spread(walks: int) -> bool:
    """Whether ``walks`` independent (batch, head) walks over the chunks keep every thread busy:
    a multiple of the thread count, or enough of them that the last round's idle threads matter
    little."""
    threads = _threads()
    return walks % threads == 0 or walks >= 4 * threads


def chunk_retention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
                    chunk_decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """The chunkwise core of a layer over whole chunks: outputs and the final state.

    Args:
        q, k: ``(batch, heads, chunks, c, dk)``; v: ``(batch, heads, chunks, c, dv)``; any strides.
        mask, query_decay, key_decay: as for :func:`chunk_output` and :func:`chunk_contributions`.
        chunk_decay: ``(heads,)``, ``gamma^c``.
        prev: ``(batch, heads, dk, dv)``, the state before the first chunk, or ``None`` (zero).

    Returns:
        ``(out (batch, heads, chunks, c, dv), final (batch, heads, dk, dv))``, differentiable in
        ``q``, ``k``, ``v`` and ``prev``. One kernel call where :func:`supports_chunk_retention`,
        else :func:`chunk_retention_reference`.
    """
    tables = (mask, query_decay, key_decay, chunk_decay)
    if (supports_chunk_retention(q, v, *tables) and (prev is None or prev.dtype == torch.float32)
            and _extension.load()):
        # The states before each chunk are kept only for a backward.
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prev))
        out, final, _ = torch.ops.yaretnet.chunk_retention(q, k, v, *tables, prev, keep)
        return out, final
    return chunk_retention_reference(q, k, v, *tables, prev)


def register() -> None:
    """Shape-only forms and autograd of the per-chunk ops and of ``chunk_retention`` (called once
    the library is loaded). The backwards keep the inputs and recompute each chunk's scores (no
    ``c x c`` tensor is saved)."""
    like = _extension.contiguous_like
    differentiable_grads = _extension.differentiable_grads

    @_extension.register_fake("yaretnet::chunk_contributions")
    def _(k: Tensor, v: Tensor, key_decay: Tensor) -> Tensor:
        return k.new_empty(*k.shape[:3], k.shape[-1], v.shape[-1])

    @_extension.register_fake("yaretnet::chunk_contributions_backward")
    def _(grad: Tensor, k: Tensor, v: Tensor, key_decay: Tensor) -> tuple[Tensor, Tensor]:
        return like(k), like(v)

    @_extension.register_fake("yaretnet::chunk_output")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor, befores: Tensor | None) -> Tensor:
        return v.new_empty(v.shape)

    @_extension.register_fake("yaretnet::chunk_output_backward")
    def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor,
          befores: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dbefores = q.new_empty(0) if befores is None else befores.new_empty(befores.shape)
        return like(q), like(k), like(v), dbefores

    @_extension.register_fake("yaretnet::chunk_retention")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
          chunk_decay: Tensor, prev: Tensor | None, keep_befores: bool) -> tuple[Tensor, Tensor, Tensor]:
        state = (*k.shape[:2], k.shape[-1], v.shape[-1])
        befores = k.new_empty(*k.shape[:3], *state[2:]) if keep_befores else k.new_empty(0)
        return v.new_empty(v.shape), k.new_empty(state), befores

    @_extension.register_fake("yaretnet::chunk_retention_backward")
    def _(grad: Tensor, grad_final: Tensor | None, q: Tensor, k: Tensor, v: Tensor, befores: Tensor,
          mask: Tensor, query_decay: Tensor, key_decay: Tensor, chunk_decay: Tensor,
          has_prev: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dprev = k.new_empty(*k.shape[:2], k.shape[-1], v.shape[-1]) if has_prev else k.new_empty(0)
        return like(q), like(k), like(v), dprev

    def contributions_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def contributions_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        k, v, key_decay = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dk, dv, _ = differentiable_grads(chunk_contributions_reference, [k, v, key_decay], grad)
            return dk, dv, None
        dk, dv = torch.ops.yaretnet.chunk_contributions_backward(grad, k, v, key_decay)
        return dk, dv, None  # the decay table: a constant

    def output_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, mask, query_decay, befores = inputs
        ctx.has_befores = befores is not None
        ctx.save_for_backward(q, k, v, mask, query_decay, *([befores] if befores is not None else []))

    def output_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, query_decay, *befores = ctx.saved_tensors
        before = befores[0] if befores else None
        if torch.is_grad_enabled():  # create_graph=True
            dq, dk, dv, _, _, dbefores = differentiable_grads(
                chunk_output_reference, [q, k, v, mask, query_decay, before], grad)
            return dq, dk, dv, None, None, dbefores
        dq, dk, dv, dbefores = torch.ops.yaretnet.chunk_output_backward(grad, q, k, v, mask, query_decay, before)
        return dq, dk, dv, None, None, (dbefores if ctx.has_befores else None)

    def retention_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, mask, query_decay, key_decay, chunk_decay, prev, keep_befores = inputs
        if not keep_befores:
            raise RuntimeError("chunk_retention: a backward needs keep_befores=True")
        # The saved states (an output only to be saved) and, in training, the final state get no
        # gradient: None instead of zero tensors autograd would fill (~1 MB a layer at 2 x 1,024).
        ctx.set_materialize_grads(False)
        ctx.has_prev = prev is not None
        ctx.save_for_backward(q, k, v, output[2], mask, query_decay, key_decay, chunk_decay,
                              *([prev] if prev is not None else []))

    def retention_backward(ctx: Any, grad: Tensor | None, grad_final: Tensor | None,
                           _: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, befores, mask, query_decay, key_decay, chunk_decay, *prev = ctx.saved_tensors
        tables = (mask, query_decay, key_decay, chunk_decay)
        if torch.is_grad_enabled():  # create_graph=True: through the plain form
            def reference(q: Tensor, k: Tensor, v: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
                return chunk_retention_reference(q, k, v, *tables, prev)

            dq, dk, dv, dprev = differentiable_grads(reference, [q, k, v, prev[0] if prev else None],
                                                     (grad, grad_final))
            return dq, dk, dv, None, None, None, None, dprev, None
        if grad is None:
            grad = torch.zeros_like(v)
        dq, dk, dv, dprev = torch.ops.yaretnet.chunk_retention_backward(
            grad, grad_final, q, k, v, befores, *tables, ctx.has_prev)
        return dq, dk, dv, None, None, None, None, (dprev if ctx.has_prev else None), None

    if _extension.HAS_REGISTER_AUTOGRAD:  # older torch uses the plain forms
        torch.library.register_autograd("yaretnet::chunk_contributions", contributions_backward,
                                        setup_context=contributions_setup)
        torch.library.register_autograd("yaretnet::chunk_output", output_backward, setup_context=output_setup)
        torch.library.register_autograd("yaretnet::chunk_retention", retention_backward,
                                        setup_context=retention_setup)


# The previous layout's names, kept for their callers: each is its ``supports`` with the
# extension built (on the first call) and loaded.
def kernel_shapes_fit(chunk: int, key_dim: int, value_dim: int, *tables: Tensor) -> bool:
    """:func:`shapes_fit`, and the extension loads (building it on the first call)."""
    return (shapes_fit(chunk, key_dim, value_dim, *tables) and _extension.load()
            and _extension.HAS_REGISTER_AUTOGRAD)


def chunk_kernels_apply(q: Tensor, v: Tensor, *tables: Tensor) -> bool:
    """:func:`supports`, and the extension loads (building it on the first call)."""
    return supports(q, v, *tables) and _extension.load()


def chunk_retention_applies(q: Tensor, v: Tensor, *tables: Tensor) -> bool:
    """:func:`supports_chunk_retention`, and the extension loads (building it on the first call)."""
    return supports_chunk_retention(q, v, *tables) and _extension.load()
