"""yet-another-retnet 0.5.1's ``RetNet`` API, as thin adapters over our model.

``RetNet(num_tokens, d_model, nhead, num_layers, ...)``, ``RetNetDecoder(layer, num_layers)`` and
``RetNetDecoderLayer(d_model, nhead, ...)`` take 0.5.1's arguments, expose its
``forward_parallel`` / ``forward_recurrent(x, seq_idx, prev_states)`` /
``forward_chunkwise(x, start_idx, prev_states)`` / ``forward(inputs, labels)`` with plain tensor
states, and read and write 0.5.1's state-dict keys, so ``RetNet(...).load_state_dict(old)``
loads a 0.5.1 checkpoint as it is. Every computation is our
:class:`~yet_another_retnet.models.RetNet` / ``RetNetDecoderLayer`` configured as 0.5.1
(:func:`~yet_another_retnet.models.yar051.config_from_yar051`); the submodules registered here
under 0.5.1's names are that model's own modules.

New code should use :class:`yet_another_retnet.RetNet` with a :class:`~yet_another_retnet.RetNetConfig`
(docs/migrating-from-0.5.md); :meth:`RetNet.to_retnet` hands over the model inside.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.legacy import gate_activation_name, is_index
from ..layers.retention import MultiScaleRetention, RetentionState
from ..models import RetNet as _OurRetNet
from ..models import RetNetState
from ..models.config import RetNetConfig
from ..models.retnet import RetNetDecoderLayer as _OurLayer
from ..models.yar051 import check_thetas, config_from_yar051, yar051_thetas

Activation = str | Callable[[Tensor], Tensor]
_NEW_API = ("yet_another_retnet.retnet is yet-another-retnet 0.5.1's API, kept for old code: new code "
            "uses yet_another_retnet.RetNet(RetNetConfig(...)) (see docs/migrating-from-0.5.md)")


def _activation(activation: Activation) -> str:
    return gate_activation_name(activation, "swish")


def _index(value: object, name: str) -> int:
    if not is_index(value) or int(value) < 0:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _memory(value: object, name: str, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A 0.5.1 plain state ``(batch, heads, dk, dv)`` in the compute dtype (float32, or float64)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be None or a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape (batch, heads, dk, dv) = {shape}, got {tuple(value.shape)}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return value.to(dtype=dtype, device=like.device)


class RetNetDecoderLayer(nn.Module):
    """0.5.1's decoder layer: ``RetNetDecoderLayer(d_model, nhead, dim_feedforward, dropout,
    activation, norm_first, layer_norm_eps, device, dtype)``. Inputs ``(batch, length, d_model)``
    (one token: ``(batch, d_model)``); states ``(batch, nhead, d_model / nhead, d_model / nhead)``."""

    norm1: nn.Module
    norm2: nn.Module
    retention: MultiScaleRetention
    linear1: nn.Linear
    linear2: nn.Linear

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "swish",
        norm_first: bool = True,
        layer_norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = config_from_yar051(1, d_model, nhead, 1, dropout, _activation(activation), dim_feedforward,
                                    norm_first, layer_norm_eps)
        self._bind(_OurLayer(config, device, dtype), config)

    @classmethod
    def _wrap(cls, layer: _OurLayer, config: RetNetConfig) -> RetNetDecoderLayer:
        """A 0.5.1 view of one of our layers (sharing its modules)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._bind(layer, config)
        return self

    def _bind(self, layer: _OurLayer, config: RetNetConfig) -> None:
        # 0.5.1's module names for our layer's modules; our layer itself is kept unregistered, so
        # each parameter has one name, 0.5.1's.
        self.__dict__["_layer"] = layer
        self.__dict__["_config"] = config
        self.norm1 = layer.retention_norm
        self.retention = cast(MultiScaleRetention, layer.retention)
        self.norm2 = layer.ffn_norm
        ffn = cast(Any, layer.ffn)
        self.linear1, self.linear2 = ffn.fc1, ffn.fc2
        # 0.5.1's head norm has no affine: ours stays the identity (1, 0), out of training.
        for p in (self.retention.norm_weight, self.retention.norm_bias):
            if p is not None:
                p.requires_grad_(False)
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_layer_to_yar051)
            self.register_load_state_dict_pre_hook(_layer_from_yar051)
        else:  # PyTorch 2.2 has these hooks under private names only
            self._register_state_dict_hook(_layer_to_yar051)
            self._register_load_state_dict_pre_hook(_layer_from_yar051, with_module=True)

    @property
    def layer(self) -> _OurLayer:
        """Our decoder layer that computes this one."""
        return cast(_OurLayer, self.__dict__["_layer"])

    def train(self, mode: bool = True) -> RetNetDecoderLayer:
        super().train(mode)
        self.layer.train(mode)  # its dropout flag (the layer itself is not a registered child)
        return self

    def forward_parallel(self, x: Tensor) -> Tensor:
        return self.layer(x, None, "parallel")[0]

    def forward_recurrent(self, x: Tensor, seq_idx: int, prev_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, memory = self._step(x.unsqueeze(1), prev_state, _index(seq_idx, "seq_idx"), "recurrent")
        return y.squeeze(1), memory

    def forward_chunkwise(self, x: Tensor, start_idx: int,
                          prev_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._step(x, prev_state, _index(start_idx, "start_idx"), "chunkwise")

    def _step(self, x: Tensor, prev_state: Tensor | None, position: int, mode: str) -> tuple[Tensor, Tensor]:
        r = self.retention
        batch = x.shape[0]
        rows = torch.full((batch,), position, dtype=torch.long, device=x.device)
        if prev_state is None:
            state = None if position == 0 else RetentionState(r.empty_state(batch, x.device, x.dtype).memory, rows)
        else:
            shape = (batch, r.num_heads, r.key_dim, r.head_dim)
            state = RetentionState(_memory(prev_state, "prev_state", x, shape), rows)
        y, new = self.layer(x, state, mode)
        return y, new.memory

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_parallel(x)


def _layer_to_yar051(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict() post-hook: the layer's keys as 0.5.1 writes them: its rotation frequencies in,
    our head norm's (identity) affine out."""
    r = cast(RetNetDecoderLayer, module).retention
    for name in ("norm_weight", "norm_bias"):
        state_dict.pop(f"{prefix}retention.{name}", None)
    if r.relative_position:
        state_dict[prefix + "retention.thetas"] = yar051_thetas(r.key_dim, r.q_proj.weight.detach())


def _layer_from_yar051(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict() pre-hook: a 0.5.1 layer's keys -> what this module registers (thetas
    checked and dropped, the head norm's identity affine filled in)."""
    r = cast(RetNetDecoderLayer, module).retention
    if prefix + "retention.thetas" in state_dict:
        check_thetas(state_dict.pop(prefix + "retention.thetas"), r.key_dim, prefix + "retention.thetas")
    if any(k.startswith(prefix) for k in state_dict):  # else load_state_dict names what is missing
        for name, value in (("norm_weight", 1.0), ("norm_bias", 0.0)):
            p = getattr(r, name)
            if p is not None:
                state_dict.setdefault(f"{prefix}retention.{name}", torch.full_like(p, value))


class RetNetDecoder(nn.Module):
    """0.5.1's stack: ``RetNetDecoder(decoder_layer, num_layers)`` holds ``num_layers`` copies of
    ``decoder_layer``. States are lists of one tensor per layer."""

    layers: nn.ModuleList

    def __init__(self, decoder_layer: RetNetDecoderLayer, num_layers: int) -> None:
        super().__init__()
        if not isinstance(decoder_layer, RetNetDecoderLayer):
            raise TypeError(f"decoder_layer must be a RetNetDecoderLayer, got {type(decoder_layer).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.num_layers = num_layers
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))

    @classmethod
    def _wrap(cls, layers: Sequence[RetNetDecoderLayer]) -> RetNetDecoder:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_layers = len(layers)
        self.layers = nn.ModuleList(layers)
        return self

    def _states(self, prev_states: Sequence[Tensor | None]) -> list[Tensor | None]:
        if not prev_states:
            return [None] * self.num_layers
        if len(prev_states) != len(self.layers):
            raise ValueError(f"Expected {len(self.layers)} previous states, got {len(prev_states)}")
        return list(prev_states)

    def forward_parallel(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = cast(RetNetDecoderLayer, layer).forward_parallel(x)
        return x

    def forward_recurrent(self, x: Tensor, seq_idx: int,
                          prev_states: Sequence[Tensor | None] = ()) -> tuple[Tensor, list[Tensor]]:
        states = []
        for layer, state in zip(self.layers, self._states(prev_states), strict=True):
            x, new = cast(RetNetDecoderLayer, layer).forward_recurrent(x, seq_idx, state)
            states.append(new)
        return x, states

    def forward_chunkwise(self, x: Tensor, start_idx: int,
                          prev_states: Sequence[Tensor | None] = ()) -> tuple[Tensor, list[Tensor]]:
        states = []
        for layer, state in zip(self.layers, self._states(prev_states), strict=True):
            x, new = cast(RetNetDecoderLayer, layer).forward_chunkwise(x, start_idx, state)
            states.append(new)
        return x, states

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_parallel(x)


class RetNet(nn.Module):
    """0.5.1's language model: ``RetNet(num_tokens, d_model=512, nhead=8, num_layers=6,
    dropout=0.1, activation="swish", dim_feedforward=2048, norm_first=True, layer_norm_eps=1e-6,
    device=None, dtype=None)``.

    ``forward_parallel(ids (batch, length))`` -> logits ``(batch, length, num_tokens)``;
    ``forward_recurrent(ids (batch,), seq_idx, prev_states)`` -> ``(logits (batch, num_tokens),
    states)``; ``forward_chunkwise(ids, start_idx, prev_states)`` -> ``(logits, states)``;
    ``forward(inputs, labels)`` -> 0.5.1's loss (cross entropy of every position's logits against
    ``labels`` at the same position: no shift). A state list may also be a
    :class:`~yet_another_retnet.RetNetState`, whose position must equal the index.
    """

    embedding: nn.Embedding
    decoder: RetNetDecoder
    out: nn.Linear

    def __init__(
        self,
        num_tokens: int,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dropout: float = 0.1,
        activation: Activation = "swish",
        dim_feedforward: int = 2048,
        norm_first: bool = True,
        layer_norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        warnings.warn(_NEW_API, DeprecationWarning, stacklevel=2)
        config = config_from_yar051(num_tokens, d_model, nhead, num_layers, dropout, _activation(activation),
                                    dim_feedforward, norm_first, layer_norm_eps)
        model = _OurRetNet(config, device=device, dtype=dtype)
        self.__dict__["_model"] = model  # not a registered child: its modules are, under 0.5.1's names
        self.d_model = d_model
        self.num_layers = num_layers
        self.embedding = model.embed_tokens
        self.decoder = RetNetDecoder._wrap(
            [RetNetDecoderLayer._wrap(cast(_OurLayer, layer), config) for layer in model.decoder.layers])
        self.out = model.lm_head

    @property
    def model(self) -> _OurRetNet:
        """Our :class:`~yet_another_retnet.RetNet` that computes this one (shares its weights)."""
        return cast(_OurRetNet, self.__dict__["_model"])

    def to_retnet(self) -> _OurRetNet:
        """The model as our :class:`~yet_another_retnet.RetNet` (the same weights, not a copy):
        ``generate``, ``save_pretrained``, ``model(ids, state=...)`` and the rest of the new API."""
        return self.model

    def train(self, mode: bool = True) -> RetNet:
        super().train(mode)
        for module in self.model.modules():  # the modules not registered here (our layers, FFNs)
            module.training = mode
        return self

    def _state(self, prev_states: Sequence[Tensor | None] | RetNetState, index: int, name: str,
               ids: Tensor) -> RetNetState | None:
        batch = ids.shape[0]
        rows = torch.full((batch,), index, dtype=torch.long, device=ids.device)
        if isinstance(prev_states, RetNetState):
            self.model.decoder.check_state(prev_states, batch)
            if bool((prev_states.position != index).any()):
                raise ValueError(f"{name}={index} disagrees with the state's position {prev_states.position.tolist()}")
            return prev_states
        if not prev_states or all(s is None for s in prev_states):
            if prev_states and len(prev_states) != self.num_layers:
                raise ValueError(f"Expected {self.num_layers} previous states, got {len(prev_states)}")
            return None if index == 0 else RetNetState(self.model.empty_state(batch).memories, rows)
        if len(prev_states) != self.num_layers:
            raise ValueError(f"Expected {self.num_layers} previous states, got {len(prev_states)}")
        empty = self.model.empty_state(batch).memories
        like = self.embedding.weight
        memories = [e if s is None else _memory(s, f"prev_states[{i}]", like, tuple(e.shape))
                    for i, (s, e) in enumerate(zip(prev_states, empty, strict=True))]
        return RetNetState(memories, rows)

    def forward_parallel(self, x: Tensor) -> Tensor:
        return self.model(x, mode="parallel").logits

    def forward_recurrent(self, x: Tensor, seq_idx: int,
                          prev_states: Sequence[Tensor | None] | RetNetState = ()) -> tuple[Tensor, list[Tensor]]:
        index = _index(seq_idx, "seq_idx")
        if not isinstance(x, Tensor) or x.dim() != 1:
            raise ValueError(f"x must be token ids of shape (batch,), got {getattr(x, 'shape', type(x).__name__)}")
        out = self.model(x[:, None], state=self._state(prev_states, index, "seq_idx", x), mode="recurrent")
        return out.logits[:, 0], list(out.state.memories)

    def forward_chunkwise(self, x: Tensor, start_idx: int,
                          prev_states: Sequence[Tensor | None] | RetNetState = ()) -> tuple[Tensor, list[Tensor]]:
        index = _index(start_idx, "start_idx")
        out = self.model(x, state=self._state(prev_states, index, "start_idx", x), mode="chunkwise")
        return out.logits, list(out.state.memories)

    def forward(self, inputs: Tensor, labels: Tensor) -> Tensor:
        pred = self.forward_parallel(inputs)
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1))


def retnet_1_3b(num_tokens: int, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> RetNet:
    """0.5.1's 1.3B size (the paper's Table 2): d_model 2048, 8 heads, 24 layers, FFN 4096."""
    return RetNet(num_tokens, d_model=2048, nhead=8, num_layers=24, dim_feedforward=4096, device=device,
                  dtype=dtype)


def retnet_2_7b(num_tokens: int, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> RetNet:
    """0.5.1's 2.7B size: d_model 2560, 10 heads, 32 layers, FFN 5120."""
    return RetNet(num_tokens, d_model=2560, nhead=10, num_layers=32, dim_feedforward=5120, device=device,
                  dtype=dtype)


def retnet_6_7b(num_tokens: int, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> RetNet:
    """0.5.1's 6.7B size: d_model 4096, 16 heads, 32 layers, FFN 8192."""
    return RetNet(num_tokens, d_model=4096, nhead=16, num_layers=32, dim_feedforward=8192, device=device,
                  dtype=dtype)


__all__ = [
    "RetNet",
    "RetNetDecoder",
    "RetNetDecoderLayer",
    "retnet_1_3b",
    "retnet_2_7b",
    "retnet_6_7b",
]
