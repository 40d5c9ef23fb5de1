"""Weight-only int8 or int4 RetNet: quantize a model, decode with quantized products, save and
load it.

:func:`quantize_model` replaces every projection of every layer (q, k, v, g, out; the FFN's fc1,
gate and fc2) and the LM head by a :class:`~yet_another_retnet.layers.quantized.QuantizedLinear`
(``"int8"``: one float scale per output channel) or an
:class:`~yet_another_retnet.layers.quantized.Int4Linear` (``"int4"``: a scale and a low value per
group of 128 input columns; ``"int4-g32"``, ``"int4-g64"``, ``"int4-g256"`` choose other groups).
The int4 methods keep the LM head in int8: it alone decides every next token, and at int4 it
caused most of the int4 model's disagreements with the float one (``docs/results/quantization``);
at 1.3B its int8 form adds ~4% to the bytes a token reads. Embeddings, norms, decays and the
recurrent state stay in the model's float dtype. Such a model:

* decodes through :func:`quantized_decode_step`: each layer's q/k/v/g (and a GLU's fc1/gate)
  quantized rows stacked into one product, the retention core in the package's kernel, every product reading
  its quantized weights once for the whole batch (``ops/cpu/quantized.py``);
* prefills with the same code as the float model, which reads each projection's ``weight``: the
  dequantized matrix, made per layer as it runs (one layer's float weights at a time);
* is saved by :func:`save_quantized` (``config.json``, ``model.safetensors`` with the quantized
  weights, their scales, the method and a checksum in its metadata, ``quantization.json``) and
  read back by ``RetNet.from_pretrained``, which refuses a file whose method, shapes or checksum
  do not match.

Whether a directory holds a quantized model is read from its weights file's metadata
(:func:`saved_quantization`), which is replaced in one atomic rename with the weights: a float
save over a quantized one (or the other way round) killed at any point leaves a directory that
loads as the model its weights file holds, never a float file read as int8 or the reverse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..layers.fast import weight_version
from ..layers.feedforward import ACTIVATIONS, FeedForward
from ..layers.quantized import Int4Linear, QuantizedLinear
from ..layers.retention import GATE_ACTIVATIONS, MultiScaleRetention
from ..ops.cpu import _extension
from ..ops.cpu.decode_step import LayerStepPlan, decoder_layer_step, retention_step
from ..ops.cpu.quantized import KERNEL_MAX_ROWS, interleave_int4
from ..ops.retention import compute_dtype
from .checkpoint import (
    CHECKSUM_KEY,
    CONFIG_NAME,
    VERIFY_ENV,
    WEIGHTS_NAME,
    atomic_write,
    check_stored_config,
    read_config,
    remove_stale,
    tensors_digest,
)
from .config import loads_strict
from .decoding import DecodingPlan, decoder_watch, decoding_plan, kernel_plan, layer_dependencies

if TYPE_CHECKING:
    from .retnet import RetNet, RetNetDecoder, RetNetDecoderLayer, RetNetOutput, RetNetState

__all__ = ["QUANTIZATION_NAME", "QUANTIZE_METHODS", "is_quantized", "load_quantized", "quantize_model",
           "quantized_decode_step", "save_quantized", "saved_quantization"]

QUANTIZE_METHODS = ("int8", "int4", "int4-g32", "int4-g64", "int4-g256")
QUANTIZATION_NAME = "quantization.json"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")
_FFN = ("fc1", "gate", "fc2")


def check_method(method: object) -> str:
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be one of {QUANTIZE_METHODS}, got {method!r}")
    return cast(str, method)


def group_size(method: str) -> int | None:
    """The int4 group size of ``method`` (``None`` for int8)."""
    if method == "int8":
        return None
    return int(method.partition("-g")[2] or 128)


def _make_layer(method: str) -> Any:
    """``linear -> quantized layer`` for ``method``'s projections."""
    group = group_size(method)
    if group is None:
        return QuantizedLinear.from_linear
    return lambda linear: Int4Linear.from_linear(linear, group)


#: What each method makes of the LM head: int8 for all of them (see the module's docstring).
HEAD_METHOD = "int8"


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`quantize_model` (or was loaded quantized)."""
    return model.__dict__.get("_quantization") is not None


def _replace(model: RetNet, make: Any, make_head: Any) -> None:
    """Every projection replaced by ``make(linear)``, the LM head by ``make_head(linear)``."""
    for layer in model.decoder.layers:
        owners = [(layer.retention, _PROJECTIONS), (layer.ffn, _FFN)]
        for owner, names in owners:
            for name in names:
                linear = getattr(owner, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(owner, name, make(linear))
    model.lm_head = make_head(model.lm_head)


def quantize_model(model: RetNet, method: str = "int8") -> RetNet:
    """Quantize ``model``'s projections and LM head to ``method`` (one of :data:`QUANTIZE_METHODS`)
    in place (eval mode); returns it.

    A tied head gets its own quantized copy (the embedding stays float). Inference only: the quantized
    weights take no gradient.
    """
    method = check_method(method)
    if is_quantized(model):
        raise ValueError("the model is quantized already")
    with torch.no_grad():
        _replace(model, _make_layer(method), _make_layer(HEAD_METHOD))
    model.release_decode_cache()
    model.__dict__["_quantization"] = method
    return model.eval()


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


_Quantized = QuantizedLinear | Int4Linear


def _stacked_product(owner: nn.Module, linears: tuple[_Quantized, ...], x: Tensor) -> Tensor:
    """``x`` through ``linears`` at once: their row-wise buffers and biases stacked into one
    product (cached on ``owner``, keyed by the buffers' storage and in-place versions: a reload,
    ``load_state_dict`` into the same buffers or ``.to()`` rebuilds it)."""
    key = tuple((*weight_version(t), t.dtype) for m in linears for t in m.qparams())
    cache = owner.__dict__.get("_qstack_cache")
    if cache is None or cache[0] != key:
        with torch.inference_mode(False):
            cache = (key, _parts(linears))
        owner.__dict__["_qstack_cache"] = cache
    params, bias = cache[1]
    return cast(Tensor, type(linears[0]).product(x, params, bias))


def _parts(linears: tuple[_Quantized, ...]) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The parts of ``linears`` stacked by rows (their :meth:`qparams`, scales and lows in float32,
    as the kernels read them), and their stacked bias (zeros for a linear without one)."""
    parts = tuple(torch.cat(p) for p in zip(*(m.qparams() for m in linears), strict=True))
    if len(parts) == 3:  # int4: each row one stream through memory (interleave_int4: why; it casts)
        parts = interleave_int4(*parts)
    else:
        parts = (parts[0], parts[1].float().contiguous())
    if all(m.bias is None for m in linears):
        return parts, None
    like = next(m.bias for m in linears if m.bias is not None)
    return parts, torch.cat([m.bias.detach() if m.bias is not None else like.new_zeros(m.out_features)
                             for m in linears])


def _layer_kernel(layer: RetNetDecoderLayer) -> LayerStepPlan | None:
    """The one-call kernel's arguments for a quantized layer (its int8/int4 products stacked as
    :func:`_stacked_product` stacks them); ``None`` where the kernel does not take the layer."""
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    linears = [retention.q_proj, retention.k_proj, retention.v_proj, retention.g_proj, retention.out_proj, ffn.fc1,
               ffn.fc2] + ([] if ffn.gate is None else [ffn.gate])
    if not (layer.pre_norm and all(isinstance(m, _Quantized) for m in linears) and _extension.load()):
        return None
    with torch.inference_mode(False), torch.no_grad():
        qkvg = _parts(cast(tuple[_Quantized, ...], (retention.q_proj, retention.k_proj, retention.v_proj,
                                                     retention.g_proj)))
        fc1 = _parts(cast(tuple[_Quantized, ...], (ffn.fc1,) if ffn.gate is None else (ffn.fc1, ffn.gate)))
        out = _parts((cast(_Quantized, retention.out_proj),))
        fc2 = _parts((cast(_Quantized, ffn.fc2),))
        return kernel_plan(layer, qkvg=qkvg, gamma=retention.gammas.float().view(-1, 1, 1), out=out, fc1=fc1,
                           fc2=fc2)


def build_quantized_plan(decoder: RetNetDecoder, dtype: torch.dtype) -> DecodingPlan:
    """A quantized decoder's :class:`~yet_another_retnet.models.decoding.DecodingPlan`: per layer the
    one-call kernel's arguments (:func:`_layer_kernel`), valid while no module, parameter or buffer
    of a layer is replaced or changed in place (every one may be copied into the stacked parts)."""
    layers = [cast("RetNetDecoderLayer", layer) for layer in decoder.layers]
    watch = decoder_watch(decoder)
    versions = []
    for layer in layers:
        watch += layer_dependencies(layer)[0]
        versions += [(t, weight_version(t)) for t in (*layer.parameters(), *layer.buffers())]
    return DecodingPlan(dtype, [], [_layer_kernel(layer) for layer in layers], watch, versions)


def _layer_tokens(layer: RetNetDecoderLayer, x: Tensor, memory: Tensor,
                  rotations: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """A quantized layer step in PyTorch ops for one token per row (``x`` ``(batch, d_model)``, one rotation) or for a
    few tokens per row (``x`` ``(batch, length, d_model)``, one rotation per position): every
    product runs once over all the tokens (each weight read once), the retention core token by
    token (recurrent form)."""
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    scale = layer.residual_scale
    h = layer.retention_norm(x) if layer.pre_norm else x
    proj = _stacked_product(retention, cast(tuple[_Quantized, ...], (
        retention.q_proj, retention.k_proj, retention.v_proj, retention.g_proj)), h)
    gamma = retention.gammas.to(memory.dtype).view(-1, 1, 1)
    norm_weight, norm_bias = retention.head_norm_affine()
    eps, rms, gate_act = retention.norm_eps, retention.head_norm == "rmsnorm", GATE_ACTIVATIONS[retention.gate_activation]
    if x.dim() == 2:
        y, memory = retention_step(proj, memory, rotations[0], gamma, norm_weight, norm_bias, eps, rms, gate_act)
    else:
        outs = []
        for t, rotation in enumerate(rotations):
            y_t, memory = retention_step(proj[:, t].contiguous(), memory, rotation, gamma, norm_weight, norm_bias,
                                         eps, rms, gate_act)
            outs.append(y_t)
        y = torch.stack(outs, dim=1)
    residual = x if scale == 1.0 else x * scale
    if layer.branch_norm:  # x + norm(f(x)) (yet-another-retnet 0.5.1's post-norm)
        x = residual + layer.retention_norm(cast(_Quantized, retention.out_proj)(y))
    else:
        x = cast(_Quantized, retention.out_proj)(y, residual)
        if not layer.pre_norm:
            x = layer.retention_norm(x)
    h = layer.ffn_norm(x) if layer.pre_norm else x
    act = ACTIVATIONS[ffn.activation]
    if ffn.gate is None:
        a = act(cast(_Quantized, ffn.fc1)(h))
    else:
        width = ffn.fc1.out_features
        both = _stacked_product(ffn, cast(tuple[_Quantized, ...], (ffn.fc1, ffn.gate)), h)
        a = act(both[..., :width]) * both[..., width:]
    residual = x if scale == 1.0 else x * scale
    if layer.branch_norm:
        return residual + layer.ffn_norm(cast(_Quantized, ffn.fc2)(a)), memory
    x = cast(_Quantized, ffn.fc2)(a, residual)
    if not layer.pre_norm:
        x = layer.ffn_norm(x)
    return x, memory


def _empty_state(model: RetNet, batch: int) -> RetNetState:
    """:meth:`RetNet.empty_state` without its look at a projection's ``weight`` (which a quantized
    layer would dequantize only to learn a dtype): zero memories in the compute dtype."""
    from .retnet import RetNetState

    dtype, device = compute_dtype(model.dtype), model.device
    memories = [torch.zeros(batch, r.num_heads, r.key_dim, r.head_dim, dtype=dtype, device=device)
                for r in (cast(MultiScaleRetention, layer.retention) for layer in model.decoder.layers)]
    return RetNetState(memories, torch.zeros(batch, dtype=torch.long, device=device))


def quantized_decode_step(model: RetNet, ids: Tensor, state: RetNetState | None,
                          in_place: bool = False) -> RetNetOutput:
    """Logits ``(batch, 1, vocab)`` and the next state for one token per row ``ids`` ``(batch,)``;
    ``in_place`` as for :func:`~yet_another_retnet.models.decoding.decode_logits`."""
    from .retnet import RetNetOutput, RetNetState

    if state is None:
        state = _empty_state(model, ids.shape[0])
    dtype = state.memories[0].dtype
    rotation = model.decoder._retention(0).step_rotation(state.position, dtype)
    if rotation is not None:
        rotation = torch.view_as_real(rotation)
    kernels = cast(list[LayerStepPlan | None], decoding_plan(model.decoder, dtype, build_quantized_plan).kernels)
    x = model._embed(ids)
    memories = []
    for layer, kernel, memory in zip(model.decoder.layers, kernels, state.memories, strict=True):
        # One kernel call where it takes the layer; else the quantized form of
        # RetNetDecoderLayer.step in PyTorch ops around the quantized products (its reference).
        out = None if kernel is None else decoder_layer_step(x, memory, rotation, kernel, in_place)
        x, memory = out if out is not None else _layer_tokens(cast("RetNetDecoderLayer", layer), x, memory, [rotation])
        memories.append(memory)
    logits = cast(_Quantized, model.lm_head)(model.decoder.norm(x))
    return RetNetOutput(logits[:, None], RetNetState(memories, state.position + 1))


def short_prompt_prefill(model: RetNet, ids: Tensor, state: RetNetState | None) -> RetNetOutput | None:
    """A short prompt's prefill on the quantized kernels: logits of its last position
    ``(batch, 1, vocab)`` and the state after it, for ``ids`` ``(batch, length)`` with at most
    :data:`~yet_another_retnet.ops.cpu.quantized.KERNEL_MAX_ROWS` tokens in all (no padding).

    Each product reads the quantized weights once for all the prompt's tokens, where the float
    forward would dequantize every matrix (``weight``) for a few rows; the retention core runs
    token by token, the recurrent form. ``None`` where it does not apply (longer prompts, no
    extension, not CPU): the caller's forward then runs.
    """
    from .retnet import RetNetOutput, RetNetState

    batch, length = ids.shape
    if not (0 < batch * length <= KERNEL_MAX_ROWS and ids.device.type == "cpu" and _extension.load()):
        return None
    if state is None:
        state = _empty_state(model, batch)
    dtype = state.memories[0].dtype
    retention = model.decoder._retention(0)
    rotations = []
    for t in range(length):
        rotation = retention.step_rotation(state.position + t, dtype)
        rotations.append(None if rotation is None else torch.view_as_real(rotation))
    x = model._embed(ids)
    memories = []
    for layer, memory in zip(model.decoder.layers, state.memories, strict=True):
        x, memory = _layer_tokens(cast("RetNetDecoderLayer", layer), x, memory, rotations)
        memories.append(memory)
    logits = cast(_Quantized, model.lm_head)(model.decoder.norm(x[:, -1:]))
    return RetNetOutput(logits, RetNetState(memories, state.position + length))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_quantized(model: RetNet, directory: str | Path) -> None:
    """Write a quantized model: ``config.json``, ``model.safetensors`` (the quantized weights with
    their float scales; the method and a checksum in its metadata) and ``quantization.json``, each
    atomically.

    Over an earlier save: its ``quantization.json`` goes before the weights are replaced (it may
    name another method; the weights file says what it holds), and a sharded float save's index
    and shards go after everything is written (until then ``model.safetensors`` decides)."""
    from .shards import remove_shards

    method = model.__dict__.get("_quantization")
    if method is None:
        raise ValueError("save_quantized: the model is not quantized (quantize_model first)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_quantized: {directory} exists and is not a directory")
    config_json = model.config.to_json()
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    group = group_size(method)
    scheme = ("symmetric, one scale per output channel" if group is None else
              f"asymmetric 4-bit codes, one scale and low value per {group} input columns, two codes a byte")
    head = "int8" if isinstance(model.lm_head, QuantizedLinear) else method
    info = json.dumps({"method": method, "bits": 8 if group is None else 4, "group_size": group, "scheme": scheme,
                       "modules": "retention q/k/v/g/out, FFN fc1/gate/fc2, LM head", "lm_head": head})
    metadata = {"format": "pt", "config": config_json, "quantization": method,
                CHECKSUM_KEY: tensors_digest(tensors)}  # checked on load, as the float files' is
    # An earlier quantized save's quantization.json naming another method (or damaged) would
    # contradict the new weights until the new one is written: it goes first. One naming this
    # method agrees with the old weights and the new ones, and stays until it is rewritten.
    try:
        declared = read_quantization(directory)
    except ValueError:
        declared = None
    if declared != method:
        remove_stale(directory / QUANTIZATION_NAME)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_json))
    atomic_write(directory / QUANTIZATION_NAME, lambda tmp: tmp.write_text(info))
    remove_shards(directory)  # an earlier sharded float save's, unused now


def read_quantization(directory: Path) -> str | None:
    """The method recorded in ``directory``'s ``quantization.json`` (``None`` when there is none)."""
    path = directory / QUANTIZATION_NAME
    if not path.is_file():
        return None
    data = loads_strict(path.read_bytes(), str(path))
    method = data.get("method") if isinstance(data, dict) else None
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"{path}: unknown quantization method {method!r} (expected one of {QUANTIZE_METHODS})")
    return cast(str, method)


def saved_quantization(directory: Path) -> str | None:
    """The quantization method of the model saved in ``directory``; ``None`` for float weights.

    The weights file decides: :func:`save_quantized` writes the method into ``model.safetensors``'
    metadata, replaced in one rename with the weights, while ``quantization.json`` is written after
    them and a float save removes a stale one only after its own files are complete. A
    ``quantization.json`` beside float weights is such a stale one; beside quantized weights it
    must name their method (``ValueError`` otherwise, as for one that is not valid).
    """
    from .shards import read_metadata

    declared = read_quantization(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return None  # float shards (or no weights: the float loader says so)
    method = read_metadata(path).get("quantization")
    if method is None:
        return None
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"{path}: unknown quantization method {method!r} in its metadata "
                         f"(expected one of {QUANTIZE_METHODS})")
    if declared is not None and declared != method:
        raise ValueError(f"{path} does not hold {declared} weights, which {directory / QUANTIZATION_NAME} "
                         f"names (its metadata says {method!r})")
    return method


def load_quantized(cls: type[RetNet], directory: Path, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, verify: bool | None = None) -> RetNet:
    """A model written by :func:`save_quantized`, built without allocating any float weights for
    the quantized matrices (the skeleton is made on the meta device and the file's tensors
    assigned). ``dtype`` casts the float parts (embedding, norms, biases; the scales stay float32).
    ``verify`` (default: on unless ``YARETNET_VERIFY_WEIGHTS=0``) checks the checksum saved with
    the weights (files without one load unverified)."""
    method = saved_quantization(directory)
    if method is None:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not hold quantized weights")
    config = read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{weights_path} is truncated or corrupt: {err}") from err
    if verify is None:
        verify = os.environ.get(VERIFY_ENV, "1") != "0"
    checksum = metadata.get(CHECKSUM_KEY)
    if verify and checksum is not None and tensors_digest(tensors) != checksum:
        raise OSError(f"{weights_path} is corrupt: its tensors do not match the checksum saved with them "
                      f"(verify=False or {VERIFY_ENV}=0 loads it anyway)")
    check_stored_config(metadata, weights_path, config, directory / CONFIG_NAME)
    model = cls(config, device="meta")
    group = group_size(method)

    def int8(linear: nn.Linear) -> QuantizedLinear:
        return QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, "meta",
                               linear.weight.dtype)

    def int4(linear: nn.Linear) -> Int4Linear:
        assert group is not None
        return Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group, "meta",
                          linear.weight.dtype)

    # Files written before the int4 methods kept the head in int8 hold an int4 head: read as written.
    int4_head = group is not None and "lm_head.weight_int4" in tensors
    _replace(model, int8 if group is None else int4, int4 if int4_head else int8)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors)
                   if tuple(tensors[n].shape) != tuple(expected[n].shape)
                   or (not tensors[n].dtype.is_floating_point if expected[n].dtype.is_floating_point
                       else tensors[n].dtype != expected[n].dtype))
    if missing or unexpected or wrong:
        raise ValueError(f"{weights_path} does not match its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape or type {wrong[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    for module in model.modules():  # the float dtype the file holds (its embedding's), off the meta device
        if isinstance(module, QuantizedLinear | Int4Linear):
            module.float_like = torch.empty(0, dtype=model.dtype)
    model.__dict__["_quantization"] = method
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device=device or "cpu")
