"""Decoding: one token per row through the model, O(1) per token.

Two things feed a decoding step besides the token ids:

* the **recurrent state** (:class:`~yet_another_retnet.models.retnet.RetNetState`): each layer's
  ``(batch, heads, dk, dv)`` memory and each row's position; it changes every token and belongs to
  the caller;
* the **decoding plan** (:class:`DecodingPlan`): what is derived from the weights once, when
  decoding starts - each layer's stacked q/k/v/g weights and decays, a GLU's stacked fc1/gate, and
  the one-call layer kernels' argument tables (``ops/cpu/decode_step.py``). It belongs to the model's
  decoder, stays out of the state dict, and is rebuilt when a weight it was made from changes
  (an optimiser step, ``load_state_dict``, ``.to()``, a replaced module or parameter). A
  quantized model's plan (``models/quantized.py``) is made by its own builder and kept the same way.

A step, as :meth:`RetNet.forward` runs it for one token in eval mode without autograd:

1. :func:`decode_logits` - picks the route: the compiled graph (``RetNet.compile_decode``) or
   the eager layers, and fetches the plan (:func:`decoding_plan`);
2. :func:`run_layers` - the rotation factors of the rows' positions, then every layer: one C++
   call per layer where the plan has kernel tables (:func:`~yet_another_retnet.ops.decode_step.
   decoder_layer_step`), else :meth:`RetNetDecoderLayer.step` in PyTorch ops (the reference of that
   kernel; ``retain(..., "recurrent")`` is the reference of both);
3. the LM head's matrix-vector product (:func:`~yet_another_retnet.layers.fast.linear_step`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..layers.fast import linear_step, stack_linears, weight_version
from ..layers.feedforward import ACTIVATIONS, FeedForward, RMSNorm
from ..layers.retention import GATE_ACTIVATIONS, MultiScaleRetention
from ..ops.cpu import _extension as cpu_extension
from ..ops.cpu.decode_step import (
    KERNEL_MAX_ROWS,
    LayerStepPlan,
    ProductWeight,
    decoder_layer_step,
    layer_step_plan,
)

if TYPE_CHECKING:
    from .retnet import RetNet, RetNetDecoder, RetNetDecoderLayer

#: A decoder layer's decoding tables: the retention's ``(w_qkvg, b_qkvg, gamma)`` and a GLU's
#: stacked ``(w, b)`` (``None`` for a plain MLP).
LayerTables = tuple[tuple[Tensor, Tensor | None, Tensor], tuple[Tensor, Tensor | None] | None]


_VERSION = operator.attrgetter("_version")


@dataclass
class DecodingPlan:
    """What a decoding step reads besides the parameters and the state, for one compute dtype.

    Attributes:
        dtype: the state's dtype the tables are for (float32, or float64).
        tables: per layer, :meth:`RetNetDecoderLayer.decode_tables` (empty in a quantized plan).
        kernels: per layer, the one-call kernel's arguments; ``None`` unless every layer has them
            (a quantized plan: ``None`` for a layer the kernel does not take).
        watch: ``(owner dict, name, object)`` for every submodule, parameter and buffer the plan
            was made from: replacing one makes the plan stale.
        versions: ``(weight, weight_version)`` of every weight copied into ``tables``: an in-place
            change to one makes the plan stale.
    """

    dtype: torch.dtype
    tables: list[LayerTables]
    kernels: list[LayerStepPlan] | list[LayerStepPlan | None] | None
    watch: list[tuple[dict[str, Any], str, Any]]
    versions: list[tuple[Tensor, tuple[int, int]]]
    builder: Callable[[RetNetDecoder, torch.dtype], DecodingPlan] | None = None

    def __post_init__(self) -> None:
        # valid()'s inputs as flat columns, so its check runs in C loops (map) rather than a
        # Python loop: ~1,600 comparisons a token at 24 layers. A tensor's being an inference
        # tensor never changes, so which weights carry a version is settled here.
        self._owners = [owner for owner, _, _ in self.watch]
        self._names = [name for _, name, _ in self.watch]
        self._objects = [obj for _, _, obj in self.watch]
        self._weights = [p for p, _ in self.versions]
        self._pointers = [version[0] for _, version in self.versions]
        self._counted = [p for p in self._weights if not p.is_inference()]
        self._counts = [version[1] for p, version in self.versions if not p.is_inference()]

    def valid(self) -> bool:
        """Whether every object and weight the plan came from is still the same (as
        :func:`~yet_another_retnet.layers.fast.weight_version` sees them). It runs per token."""
        return (all(map(operator.is_, map(dict.get, self._owners, self._names), self._objects))
                and list(map(Tensor.data_ptr, self._weights)) == self._pointers
                and list(map(_VERSION, self._counted)) == self._counts)


def decoding_plan(decoder: RetNetDecoder, dtype: torch.dtype,
                  builder: Callable[[RetNetDecoder, torch.dtype], DecodingPlan] | None = None) -> DecodingPlan:
    """The decoder's plan for a state of ``dtype``, made by ``builder`` (default :func:`build_plan`):
    the one it holds if still valid and made so, else a new one."""
    builder = builder or build_plan
    plan = decoder.__dict__.get("_decoding_plan")
    if plan is not None and plan.dtype == dtype and plan.builder is builder and plan.valid():
        return cast(DecodingPlan, plan)
    plan = builder(decoder, dtype)
    plan.builder = builder
    decoder.__dict__["_decoding_plan"] = plan
    return plan


def release_plan(decoder: RetNetDecoder) -> None:
    """Drop the decoder's plan (its stacked weight copies); the next step builds a new one."""
    decoder.__dict__.pop("_decoding_plan", None)


def build_plan(decoder: RetNetDecoder, dtype: torch.dtype) -> DecodingPlan:
    """Every layer's tables and kernel arguments, and what they depend on."""
    layers = [cast("RetNetDecoderLayer", layer) for layer in decoder.layers]
    tables = [layer.decode_tables(dtype) for layer in layers]
    kernels = [layer_kernel_plan(layer, t) for layer, t in zip(layers, tables, strict=True)]
    watch = decoder_watch(decoder)
    copied: list[Tensor] = []
    for layer in layers:
        layer_watch, layer_copied = layer_dependencies(layer)
        watch += layer_watch
        copied += layer_copied
    ready = [k for k in kernels if k is not None]
    return DecodingPlan(dtype, tables, ready if len(ready) == len(kernels) else None, watch,
                        [(p, weight_version(p)) for p in copied])


def decoder_watch(decoder: RetNetDecoder) -> list[tuple[dict[str, Any], str, Any]]:
    """``(owner dict, name, object)`` for the decoder's layer list and each layer in it."""
    watch: list[tuple[dict[str, Any], str, Any]] = [(decoder._modules, "layers", decoder.layers)]
    return watch + [(decoder.layers._modules, name, layer) for name, layer in decoder.layers._modules.items()]


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def decode_logits(model: RetNet, ids: Tensor, memories: list[Tensor],
                  position: Tensor, in_place: bool = False) -> tuple[Tensor, list[Tensor]]:
    """``(logits (batch, vocab), new memories)`` for one token per row ``ids`` ``(batch,)`` at
    ``position`` ``(batch,)``; ``memories`` (one ``(batch, heads, dk, dv)`` per layer) unchanged,
    or with ``in_place`` overwritten by the new ones where the layer kernels take the step (the
    new memories returned are then those tensors; the caller copies the others).

    The compiled graph (:func:`compile_decode`) runs the step unless the one-call layer kernels
    take it (its ``keep_kernel_steps``, up to :data:`KERNEL_MAX_ROWS` rows); without a graph the
    eager layers run it.
    """
    compiled, keep_kernel_steps = model.__dict__.get("_compiled_decode", (None, False))
    dtype = memories[0].dtype
    plan = decoding_plan(model.decoder, dtype)
    if compiled is None or (keep_kernel_steps and ids.shape[0] <= KERNEL_MAX_ROWS and plan.kernels is not None):
        # Eager: where a graph exists, the one-call layer kernels beat it (see RetNet.compile_decode).
        hidden, memories = run_layers(model.decoder, model._embed(ids), memories, position, plan, in_place)
        return linear_step(hidden, model.lm_head.weight, model.lm_head.bias), memories
    rotation = model.decoder._retention(0).step_rotation(position, dtype)
    real = None if rotation is None else torch.view_as_real(rotation)  # inductor: no complex ops
    return cast(tuple[Tensor, list[Tensor]], compiled(ids, list(memories), real, plan.tables))


def run_layers(decoder: RetNetDecoder, hidden: Tensor, memories: list[Tensor], position: Tensor,
               plan: DecodingPlan, in_place: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Every layer and the final norm for one token per row: ``hidden`` ``(batch, d_model)`` ->
    normed ``(batch, d_model)``, and the new memories.

    One kernel call per layer where the plan has the kernels' tables (a layer the kernel declines
    for these inputs, another dtype, steps in PyTorch ops); else
    :meth:`RetNetDecoder.step_layers` in PyTorch ops.
    """
    rotation = decoder._retention(0).step_rotation(position, plan.dtype)
    if plan.kernels is None:
        return cast(tuple[Tensor, list[Tensor]],
                    decoder.step_layers(hidden, list(memories), rotation, plan.tables, in_place))
    # Both the kernel and the PyTorch step take the rotation in reals: converted once, not per layer.
    if rotation is not None:
        rotation = torch.view_as_real(rotation)
    new_memories = []
    for i, (kernel, memory) in enumerate(zip(plan.kernels, memories, strict=True)):
        assert kernel is not None  # a float plan has kernels for every layer or none
        out = decoder_layer_step(hidden, memory, rotation, kernel, in_place)
        if out is None:
            layer = cast("RetNetDecoderLayer", decoder.layers[i])
            out = layer.step(hidden, memory, rotation, plan.tables[i])
        hidden, memory = out
        new_memories.append(memory)
    return decoder.norm(hidden), new_memories


# --------------------------------------------------------------------------------------------
# What a plan is made of
# --------------------------------------------------------------------------------------------


def layer_tables(layer: RetNetDecoderLayer, dtype: torch.dtype) -> LayerTables:
    """The retention's stacked q/k/v/g weights and decays (:meth:`MultiScaleRetention.decode_tables`)
    and a GLU's stacked fc1/gate weights (``None`` for a plain MLP), made afresh."""
    ffn = cast(FeedForward, layer.ffn)
    glu = stack_linears((ffn.fc1, ffn.gate)) if ffn.gate is not None else None
    return cast(MultiScaleRetention, layer.retention).decode_tables(dtype), glu


def layer_kernel_plan(layer: RetNetDecoderLayer, tables: LayerTables) -> LayerStepPlan | None:
    """The layer's arguments for the one-call decoding kernel (``ops/cpu/decode_step.py``), from
    ``tables`` (:func:`layer_tables`); ``None`` where the kernel does not run it (post-norm, an
    unknown norm or activation, other dtypes or devices, no C++ toolchain)."""
    (weight, bias, gamma), glu = tables
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    out, fc2 = retention.out_proj, ffn.fc2
    return kernel_plan(layer, qkvg=(weight, bias), gamma=gamma, out=(out.weight, out.bias),
                       fc1=glu if glu is not None else (ffn.fc1.weight, ffn.fc1.bias), fc2=(fc2.weight, fc2.bias))


def kernel_plan(layer: RetNetDecoderLayer, *, qkvg: tuple[ProductWeight, Tensor | None], gamma: Tensor,
                out: tuple[ProductWeight, Tensor | None], fc1: tuple[ProductWeight, Tensor | None],
                fc2: tuple[ProductWeight, Tensor | None]) -> LayerStepPlan | None:
    """:func:`layer_kernel_plan` for given products (dense, or a quantized model's int8/int4 parts:
    ``models/quantized.py``); the norms, head norm, activations and residual scale from ``layer``."""
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    first, second = _block_norm(layer.retention_norm), _block_norm(layer.ffn_norm)
    if not layer.pre_norm or first is None or second is None:
        return None
    (w1, b1, eps, rms), (w2, b2, _, _) = first, second
    return layer_step_plan(
        norm1=(w1, b1), qkvg=qkvg, gamma=gamma, head_norm=retention.head_norm_affine(), out=out, norm2=(w2, b2),
        fc1=fc1, fc2=fc2, block_eps=eps, head_eps=retention.norm_eps, block_rms=rms,
        head_rms=retention.head_norm == "rmsnorm", gate_act=GATE_ACTIVATIONS[retention.gate_activation],
        ffn_act=ACTIVATIONS[ffn.activation], glu=ffn.gate is not None, residual_scale=layer.residual_scale)


def layer_dependencies(layer: RetNetDecoderLayer) -> tuple[list[tuple[dict[str, Any], str, Any]], list[Tensor]]:
    """What a layer's part of a plan stays valid for: ``(owner dict, name, object)`` for every
    submodule, parameter and buffer it was made from (replacing one invalidates it), and the
    weights copied into the stacked tables (an in-place change to one invalidates it too)."""
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    modules: list[nn.Module] = [layer, retention, ffn]
    owned: list[nn.Module] = [layer.retention_norm, layer.ffn_norm, retention.q_proj, retention.k_proj,
                              retention.v_proj, retention.g_proj, retention.out_proj, ffn.fc1, ffn.fc2]
    if ffn.gate is not None:
        owned.append(ffn.gate)
    watch: list[tuple[dict[str, Any], str, Any]] = []
    for module in modules + owned:
        for table in (module._modules, module._parameters, module._buffers):
            watch.extend((table, name, obj) for name, obj in table.items())
    stacked = [retention.q_proj, retention.k_proj, retention.v_proj, retention.g_proj]
    if ffn.gate is not None:
        stacked += [ffn.fc1, ffn.gate]
    copied = [p for m in stacked for p in (m.weight, m.bias) if p is not None]
    if retention.head_weight is not None:  # repeated per head into the kernel's tables
        copied.append(retention.head_weight)
    return watch, copied


def _block_norm(norm: nn.Module) -> tuple[Tensor, Tensor | None, float, bool] | None:
    """``(weight, bias, eps, is_rms)`` of a block norm for the fused decoding step; ``None`` for a
    norm it does not know (then the layer steps in PyTorch ops)."""
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps, False
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    return None


# --------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------


def compile_decode(model: RetNet, enabled: bool, keep_kernel_steps: bool, compile_options: dict[str, Any]) -> None:
    """Set (or, ``enabled=False``, drop) ``model``'s compiled decoding step: ``torch.compile`` of
    :meth:`RetNet._decode_logits` (embedding, every layer, final norm, LM head as one graph). A
    setting of the model, not part of a plan: it reads the plan's tables as inputs, so it outlives
    weight changes (a recompilation costs tens of seconds)."""
    if not enabled:
        model.__dict__.pop("_compiled_decode", None)
        return
    cpu_extension.load()  # the kernels decided (and built) now, not while tracing
    options: dict[str, Any] = {"dynamic": False, **compile_options}
    options["options"] = {**inductor_decode_options(), **options.get("options", {})}
    model.__dict__["_compiled_decode"] = (torch.compile(model._decode_logits, **options), bool(keep_kernel_steps))


def inductor_decode_options() -> dict[str, Any]:
    """Inductor settings for the decoding graph.

    By default inductor inlines a cheap element-wise producer (a norm, GELU, the embedding) into
    the reduction that consumes it; for a matrix-vector product that recomputes the producer once
    per *output row* (one measurement: 12 layers of norm + GELU + two d 768 products, bfloat16,
    47.6 ms compiled against 2.7 ms eager). Realising every multi-op buffer first keeps each
    product a plain streaming reduction. The setting's name differs across torch versions. The
    products themselves stay calls of the gemv kernel (``ops/cpu/gemv.py``) where it is built.
    """
    import torch._inductor.config as inductor_config

    options: dict[str, Any] = {}
    for key in ("realize_cpu_opcount_threshold", "realize_opcount_threshold"):
        if hasattr(inductor_config, key):
            options[key] = 1
            break
    # The graph's wrapper in C++ instead of Python: less per step (about 60 kernel and gemv calls
    # at d 768), at a longer first compilation (cached on disk afterwards).
    if hasattr(inductor_config, "cpp_wrapper"):
        options["cpp_wrapper"] = True
    return options
