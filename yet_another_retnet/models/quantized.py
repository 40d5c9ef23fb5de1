"""Weight-only int8 RetNet: quantize a model, decode with int8 products, save and load it.

:func:`quantize_model` replaces every projection of every layer (q, k, v, g, out; the FFN's fc1,
gate and fc2) and the LM head by a :class:`~yet_another_retnet.layers.quantized.QuantizedLinear`
(int8, one float scale per output channel). Embeddings, norms, decays and the recurrent state stay
in the model's float dtype. Such a model:

* decodes through :func:`quantized_decode_step`: each layer's q/k/v/g (and a GLU's fc1/gate) int8
  rows stacked into one product, the retention core in the package's kernel, every product reading
  its int8 weights once for the whole batch (``ops/quantized.py``);
* prefills with the same code as the float model, which reads each projection's ``weight``: the
  dequantized matrix, made per layer as it runs (one layer's float weights at a time);
* is saved by :func:`save_quantized` (``config.json``, ``model.safetensors`` with the int8 weights
  and their scales, ``quantization.json``) and read back by ``RetNet.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..layers.feedforward import ACTIVATIONS, FeedForward
from ..layers.quantized import QuantizedLinear
from ..layers.retention import GATE_ACTIVATIONS, MultiScaleRetention
from ..ops.decode_step import retention_step
from ..ops.quantized import qlinear
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_config
from .config import RetNetConfig

if TYPE_CHECKING:
    from .retnet import RetNet, RetNetDecoderLayer, RetNetOutput, RetNetState

__all__ = ["QUANTIZATION_NAME", "QUANTIZE_METHODS", "is_quantized", "load_quantized", "quantize_model",
           "quantized_decode_step", "save_quantized"]

QUANTIZE_METHODS = ("int8",)
QUANTIZATION_NAME = "quantization.json"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")
_FFN = ("fc1", "gate", "fc2")


def check_method(method: object) -> str:
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be one of {QUANTIZE_METHODS}, got {method!r}")
    return cast(str, method)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`quantize_model` (or was loaded quantized)."""
    return model.__dict__.get("_quantization") is not None


def _replace(model: RetNet, make: Any) -> None:
    """Every projection and the head replaced by ``make(name, linear)``."""
    for layer in model.decoder.layers:
        owners = [(layer.retention, _PROJECTIONS), (layer.ffn, _FFN)]
        for owner, names in owners:
            for name in names:
                linear = getattr(owner, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(owner, name, make(linear))
    model.lm_head = make(model.lm_head)


def quantize_model(model: RetNet, method: str = "int8") -> RetNet:
    """Quantize ``model``'s projections and LM head to ``method`` in place (eval mode); returns it.

    A tied head gets its own int8 copy (the embedding stays float). Inference only: the quantized
    weights take no gradient.
    """
    method = check_method(method)
    if is_quantized(model):
        raise ValueError("the model is quantized already")
    with torch.no_grad():
        _replace(model, QuantizedLinear.from_linear)
    model.release_decode_cache()
    model.__dict__["_quantization"] = method
    return model.eval()


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _stacked(owner: nn.Module, linears: tuple[QuantizedLinear, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
    """The int8 rows, scales and biases of ``linears`` stacked into one product, cached on
    ``owner`` (keyed by the buffers' storage: a reload or ``.to()`` rebuilds it)."""
    key = tuple((m.weight_int8.data_ptr(), m.weight_scale.data_ptr(), m.weight_scale.dtype) for m in linears)
    cache = owner.__dict__.get("_qstack_cache")
    if cache is None or cache[0] != key:
        with torch.inference_mode(False):
            q = torch.cat([m.weight_int8 for m in linears])
            scale = torch.cat([m.weight_scale for m in linears])
            bias = torch.cat([m.bias.detach() for m in linears if m.bias is not None]) \
                if linears[0].bias is not None else None
        cache = (key, (q, scale, bias))
        owner.__dict__["_qstack_cache"] = cache
    return cast(tuple[Tensor, Tensor, Tensor | None], cache[1])


def _layer_step(layer: RetNetDecoderLayer, x: Tensor, memory: Tensor, rotation: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token per row through a quantized layer: ``x`` ``(batch, d_model)`` -> same, new memory.

    The int8 form of :meth:`RetNetDecoderLayer.step` (same order of operations, pre- or post-norm).
    """
    retention = cast(MultiScaleRetention, layer.retention)
    ffn = cast(FeedForward, layer.ffn)
    scale = layer.residual_scale
    q, s, b = _stacked(retention, cast(tuple[QuantizedLinear, ...], (
        retention.q_proj, retention.k_proj, retention.v_proj, retention.g_proj)))
    h = layer.retention_norm(x) if layer.pre_norm else x
    proj = qlinear(h, q, s, b)
    gamma = retention.gammas.to(memory.dtype).view(-1, 1, 1)
    y, memory = retention_step(proj, memory, rotation, gamma, *retention.head_norm_affine(),
                               retention.norm_eps, retention.head_norm == "rmsnorm",
                               GATE_ACTIVATIONS[retention.gate_activation])
    residual = x if scale == 1.0 else x * scale
    if layer.branch_norm:  # x + norm(f(x)) (yet-another-retnet 0.5.1's post-norm)
        x = residual + layer.retention_norm(cast(QuantizedLinear, retention.out_proj)(y))
    else:
        x = cast(QuantizedLinear, retention.out_proj)(y, residual)
        if not layer.pre_norm:
            x = layer.retention_norm(x)
    h = layer.ffn_norm(x) if layer.pre_norm else x
    act = ACTIVATIONS[ffn.activation]
    if ffn.gate is None:
        a = act(cast(QuantizedLinear, ffn.fc1)(h))
    else:
        width = ffn.fc1.out_features
        both = qlinear(h, *_stacked(ffn, cast(tuple[QuantizedLinear, ...], (ffn.fc1, ffn.gate))))
        a = act(both[:, :width]) * both[:, width:]
    residual = x if scale == 1.0 else x * scale
    if layer.branch_norm:
        return residual + layer.ffn_norm(cast(QuantizedLinear, ffn.fc2)(a)), memory
    x = cast(QuantizedLinear, ffn.fc2)(a, residual)
    if not layer.pre_norm:
        x = layer.ffn_norm(x)
    return x, memory


def quantized_decode_step(model: RetNet, ids: Tensor, state: RetNetState | None) -> RetNetOutput:
    """Logits ``(batch, 1, vocab)`` and the next state for one token per row ``ids`` ``(batch,)``."""
    from .retnet import RetNetOutput, RetNetState

    if state is None:
        state = model.empty_state(ids.shape[0])
    dtype = state.memories[0].dtype
    rotation = model.decoder._retention(0).step_rotation(state.position, dtype)
    if rotation is not None:
        rotation = torch.view_as_real(rotation)
    x = model._embed(ids)
    memories = []
    for layer, memory in zip(model.decoder.layers, state.memories, strict=True):
        x, memory = _layer_step(cast("RetNetDecoderLayer", layer), x, memory, rotation)
        memories.append(memory)
    logits = cast(QuantizedLinear, model.lm_head)(model.decoder.norm(x))
    return RetNetOutput(logits[:, None], RetNetState(memories, state.position + 1))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_quantized(model: RetNet, directory: str | Path) -> None:
    """Write a quantized model: ``config.json``, ``model.safetensors`` (int8 weights with their
    float scales) and ``quantization.json``, each atomically."""
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
    info = json.dumps({"method": method, "scheme": "symmetric, one scale per output channel",
                       "modules": "retention q/k/v/g/out, FFN fc1/gate/fc2, LM head"})
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(
        tensors, str(tmp), metadata={"format": "pt", "config": config_json, "quantization": method}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_json))
    atomic_write(directory / QUANTIZATION_NAME, lambda tmp: tmp.write_text(info))


def read_quantization(directory: Path) -> str | None:
    """The method recorded in ``directory``'s ``quantization.json`` (``None`` when there is none)."""
    path = directory / QUANTIZATION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    method = data.get("method") if isinstance(data, dict) else None
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"{path}: unknown quantization method {method!r} (expected one of {QUANTIZE_METHODS})")
    return cast(str, method)


def load_quantized(cls: type[RetNet], directory: Path, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> RetNet:
    """A model written by :func:`save_quantized`, built without allocating any float weights for
    the quantized matrices (the skeleton is made on the meta device and the file's tensors
    assigned). ``dtype`` casts the float parts (embedding, norms, scales)."""
    method = read_quantization(directory)
    assert method is not None
    config = read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{weights_path} is truncated or corrupt: {err}") from err
    saved = metadata.get("config")
    if saved is not None and RetNetConfig.from_json(saved) != config:
        raise ValueError(f"{directory / CONFIG_NAME} does not match the config stored with {weights_path}")
    if metadata.get("quantization") != method:
        raise ValueError(f"{weights_path} does not hold {method} weights (its metadata says "
                         f"{metadata.get('quantization')!r})")
    model = cls(config, device="meta")
    _replace(model, lambda linear: QuantizedLinear(linear.in_features, linear.out_features,
                                                   linear.bias is not None, "meta", linear.weight.dtype))
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors)
                   if tuple(tensors[n].shape) != tuple(expected[n].shape) or tensors[n].dtype.is_floating_point
                   != expected[n].dtype.is_floating_point)
    if missing or unexpected or wrong:
        raise ValueError(f"{weights_path} does not match its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape or type {wrong[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.__dict__["_quantization"] = method
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device=device or "cpu")
