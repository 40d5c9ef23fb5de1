"""The decoding-step CPU kernels (``ops/cpu/csrc/decode_step.cpp``) against float64 math.

``retention_step`` (a retention layer's core for one token per row) is checked against the formula
written out in float64; ``decoder_layer_step`` (a whole pre-norm layer in one call) against a
float64 copy of the model decoding through its recurrent reference form.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import yet_another_retnet.models.decoding as decoding_module
from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.models.quantized import quantize_model, quantized_decode_step
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.decode_step import (
    KERNEL_MAX_ROWS,
    decoder_layer_step,
    layer_step_plan,
    retention_step,
)

pytestmark = pytest.mark.skipif(not _extension.load(), reason="the C++ extension is not built here")

EPS = 1e-5
ACTS = {"identity": None, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def float64_act(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1 + torch.special.erf(z / math.sqrt(2)))
    if name == "relu":
        return z.clamp_min(0)
    return z


def float64_core(proj: torch.Tensor, memory: torch.Tensor, angles: torch.Tensor | None, gamma: torch.Tensor,
                 w: torch.Tensor | None, b: torch.Tensor | None, rms: bool,
                 act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The step written out: pair rotation by ``angles`` ``(batch, dk / 2)``, the decayed memory
    update, the read-out, the head norm and the gate, all float64."""
    batch, heads, dk, dv = memory.shape
    p, s = proj.double(), memory.double()
    q = p[:, : heads * dk].reshape(batch, heads, dk)
    k = p[:, heads * dk : 2 * heads * dk].reshape(batch, heads, dk)
    v = p[:, 2 * heads * dk : 2 * heads * dk + heads * dv].reshape(batch, heads, dv)
    g = p[:, 2 * heads * dk + heads * dv :]
    if angles is not None:
        cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            even, odd = x[..., 0::2], x[..., 1::2]
            return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

        q, k = rotate(q), rotate(k)
    k = k / math.sqrt(dk)
    new = gamma.double().view(1, heads, 1, 1) * s + k[..., :, None] * v[..., None, :]
    y = torch.einsum("bhi,bhij->bhj", q, new)
    if rms:
        y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + EPS)
    else:
        centred = y - y.mean(-1, keepdim=True)
        y = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + EPS)
    y = y.reshape(batch, heads * dv)
    if w is not None and b is not None:
        y = y * w.double() + b.double()
    return float64_act(act, g) * y, new


def core_inputs(batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype, seed: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    width = 2 * heads * (dk + dv)
    # A column slice of a wider tensor (rows not contiguous); gate values up to ~+-12 so the
    # activations' tails are exercised.
    wide = torch.randn(batch, width + 5, generator=gen)
    wide[:, 3 + width - heads * dv : 3 + width] *= 4
    return {
        "proj": wide.to(dtype)[:, 3 : 3 + width],
        "memory": torch.randn(batch, heads, dk, dv, generator=gen),
        "angles": torch.rand(batch, dk // 2, generator=gen, dtype=torch.float64) * 1000,
        "gamma": 1 - torch.rand(heads, generator=gen) * 0.1,
        "w": (1 + 0.5 * torch.randn(heads * dv, generator=gen)).to(dtype),
        "b": (0.3 * torch.randn(heads * dv, generator=gen)).to(dtype),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("rotation", [True, False])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("size", ["small", "streamed"])
def test_retention_step_kernel_equals_the_float64_formula(dtype: torch.dtype, tol: float, rotation: bool, rms: bool,
                                                          act: str, size: str) -> None:
    # "streamed": a 2 MB memory, which the kernel writes with streaming stores (AVX-512)
    batch, heads, dk, dv = (3, 4, 16, 24) if size == "small" else (1, 2, 256, 1024)
    x = core_inputs(batch, heads, dk, dv, dtype, f"{dtype}{rotation}{rms}{act}{size}")
    angles = x["angles"] if rotation else None
    factors = None
    if angles is not None:  # what MultiScaleRetention.step_rotation hands over: query, then key with dk^-0.5
        unit = torch.polar(torch.ones_like(angles), angles)
        factors = torch.stack((unit, unit * dk**-0.5), dim=1)[:, :, None].to(torch.complex64)
    w, b = (None, None) if rms else (x["w"], x["b"])
    memory_before = x["memory"].clone()
    with torch.inference_mode():
        out, new = retention_step(x["proj"], x["memory"], factors, x["gamma"].view(-1, 1, 1), w, b, EPS, rms, ACTS[act])
    want_out, want_new = float64_core(x["proj"], x["memory"], angles, x["gamma"], w, b, rms, act)
    assert out.dtype == dtype and out.shape == (batch, heads * dv) and new.dtype == torch.float32
    assert rel(new, want_new) < 1e-6
    assert rel(out, want_out) < tol, rel(out, want_out)
    assert torch.equal(x["memory"], memory_before)  # the caller's memory is left alone


@pytest.mark.parametrize("size", ["small", "streamed"])
def test_retention_step_in_place_writes_what_a_new_memory_gets(size: str) -> None:
    # retention_step_inplace (RetNet.step_: generate, chat, the serving loop): each value read before it is
    # overwritten, by the same task, on both store paths (streamed from 2 MB)
    batch, heads, dk, dv = (3, 4, 16, 24) if size == "small" else (2, 2, 256, 1024)
    x = core_inputs(batch, heads, dk, dv, torch.float32, f"inplace{size}")
    args = (None, x["gamma"], x["w"], x["b"], EPS, False, 1)
    with torch.inference_mode():
        out, new = torch.ops.yaretnet.retention_step(x["proj"], x["memory"], *args)
        memory = x["memory"].clone()
        out_in_place = torch.ops.yaretnet.retention_step_inplace(x["proj"], memory, *args)
    assert torch.equal(memory, new) and torch.equal(out_in_place, out)
    assert not torch.equal(memory, x["memory"])


def make_model(dtype: torch.dtype, **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": 53, "d_model": 48, "num_heads": 3, "num_layers": 2, "ffn_dim": 40,
                              "dropout": 0.0, "chunk_size": 4, "tie_embeddings": False}
    fields.update(overrides)
    torch.manual_seed(zlib.crc32(repr(sorted(overrides.items())).encode()))
    model = RetNet(RetNetConfig(**fields)).eval()
    with torch.no_grad():  # every parameter off its initial value, so a dropped term shows
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.embed_tokens.weight.mul_(10.0)
    return model.to(dtype)


LAYERS: dict[str, dict[str, Any]] = {
    "paper (value x2, groupnorm, gelu mlp, swish gate)": {},
    "torchscale-like (glu, swish, rmsnorm, biases)": {"ffn": "glu", "activation": "swish", "block_norm": "rmsnorm",
                                                      "head_norm": "rmsnorm", "bias": True},
    "no rotation, gelu gate, relu ffn, residual scale": {"relative_position": False, "gate_activation": "gelu",
                                                         "activation": "relu", "residual_scale": 1.3},
    "identity gate, value x1, layernorm without bias": {"gate_activation": "identity", "value_factor": 1.0,
                                                        "bias": False, "embedding_norm": True},
}


def decode(model: RetNet, tokens: torch.Tensor, fast: bool,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill the first 5 tokens chunkwise (``mask``: their left padding), then one token at a
    time; the logits of every step."""
    model.fast_decode = fast
    with torch.inference_mode():
        state = model(tokens[:, :5], mode="chunkwise", attention_mask=mask).state
        logits = []
        for t in range(5, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state=state, mode="recurrent")
            logits.append(out.logits)
            state = out.state
    return torch.cat(logits, dim=1), state.memories


@pytest.mark.parametrize("variant", sorted(LAYERS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3, 11])
def test_decoder_layer_step_kernel_equals_the_float64_recurrent_form(variant: str, dtype: torch.dtype, tol: float,
                                                                     batch: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of rows: each weight is read once for up to eight rows (11: a group of 8 and one of
    # 3), every row at its own position (left padding of 0 to 3 prompt tokens). bfloat16: within
    # 2e-2 of float64's largest logit, or (a row whose block norm amplifies the rounding) no
    # further off than the PyTorch-ops step of the same bfloat16 model.
    model = make_model(dtype, **LAYERS[variant])
    reference = copy.deepcopy(model).double()  # for bf16: the same (rounded) weights in float64
    calls = []
    kernel = decoding_module.decoder_layer_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(decoding_module, "decoder_layer_step", counted)
    tokens = torch.randint(0, 53, (batch, 14), generator=torch.Generator().manual_seed(3 if batch == 1 else batch))
    mask = torch.ones(batch, 5, dtype=torch.long)
    for row in range(batch):
        mask[row, : row % 4] = 0
    got, got_memories = decode(model, tokens, fast=True, mask=mask)
    assert len(calls) == 9 * 2  # every step of every layer went through the kernel
    want, want_memories = decode(reference, tokens, fast=False, mask=mask)
    assert got.dtype == dtype and got.shape == want.shape == (batch, 9, 53)
    bound = tol
    if dtype == torch.bfloat16:
        monkeypatch.setattr(decoding_module, "decoder_layer_step", lambda *args, **kwargs: None)
        ops, _ = decode(model, tokens, fast=True, mask=mask)
        bound = max(tol, 1.25 * rel(ops, want))
    assert rel(got, want) < bound, (rel(got, want), bound)
    for g, w in zip(got_memories, want_memories, strict=True):
        assert g.dtype == torch.float32 and rel(g, w) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("ffn", ["glu", "mlp"])
def test_a_layer_step_gives_the_same_bits_on_any_number_of_threads(weights: str, ffn: str) -> None:
    # Big enough that the layer kernel runs each layer as one team of threads (csrc/team.h: every
    # product split over the members, barriers between): every row, head and hidden unit must come
    # out as it does on one thread. A hidden size that is not a multiple of 16 puts a scalar tail
    # in the activation, which must stay the same units' tail however the units are shared; three
    # threads split unevenly (and outnumber CI's cores); 11 rows take two groups of vectors.
    model = make_model(torch.bfloat16 if weights == "bfloat16" else torch.float32, d_model=256, num_heads=4,
                       ffn_dim=344, ffn=ffn, num_layers=2)
    if weights in ("int8", "int4"):
        model = quantize_model(model, weights)
    tokens = torch.randint(0, 53, (11, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        state = model(tokens[:, :5], mode="chunkwise").state  # the layers alone below: MKL's
        hidden = model._embed(tokens[:, 5])  # products in a prefill depend on the thread count

        def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
            if weights in ("int8", "int4"):  # the layers and the quantized head (our kernels)
                out = quantized_decode_step(model, tokens[:, 5], state)
                return out.logits, out.state.memories
            plan = decoding_module.decoding_plan(model.decoder, state.memories[0].dtype)
            assert plan.kernels is not None
            return decoding_module.run_layers(model.decoder, hidden, state.memories, state.position, plan)

        threads = torch.get_num_threads()
        try:
            runs = []
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                runs.append(step())
        finally:
            torch.set_num_threads(threads)
    (out, memories), *others = runs
    assert torch.isfinite(out).all() and not torch.equal(memories[0], state.memories[0])
    for other_out, other_memories in others:
        assert torch.equal(other_out, out)
        assert all(torch.equal(a, b) for a, b in zip(other_memories, memories, strict=True))


def test_the_layer_kernel_steps_aside_where_it_does_not_apply() -> None:
    model = make_model(torch.float32)
    layer = model.decoder.layers[0]
    attn, glu = layer.decode_tables(torch.float32)
    plan = layer.step_plan((attn, glu))
    assert plan is not None and plan.dtype == torch.float32
    memory = torch.zeros(1, 3, 16, 32)
    with torch.inference_mode():
        assert decoder_layer_step(torch.zeros(1, 48), memory, None, plan) is not None
        assert decoder_layer_step(torch.zeros(2, 48), memory.expand(2, -1, -1, -1), None, plan) is not None  # rows
        rows = KERNEL_MAX_ROWS + 1  # past this many rows PyTorch's products are faster
        assert decoder_layer_step(torch.zeros(rows, 48), memory.expand(rows, -1, -1, -1), None, plan) is None
        assert decoder_layer_step(torch.zeros(1, 48, dtype=torch.bfloat16), memory, None, plan) is None  # dtype
        assert decoder_layer_step(torch.zeros(1, 48), memory.double(), None, plan) is None
    assert decoder_layer_step(torch.zeros(1, 48), memory, None, plan) is None  # grad mode on
    kw = {"norm1": (layer.retention_norm.weight, None), "qkvg": attn[:2], "gamma": attn[2],
          "head_norm": (layer.retention.norm_weight, layer.retention.norm_bias),
          "out": (layer.retention.out_proj.weight, None), "norm2": (layer.ffn_norm.weight, None),
          "fc1": (layer.ffn.fc1.weight, None), "fc2": (layer.ffn.fc2.weight, None), "block_eps": 1e-5,
          "head_eps": 1e-5, "block_rms": False, "head_rms": False, "gate_act": F.silu, "ffn_act": F.gelu,
          "glu": False, "residual_scale": 1.0}
    assert layer_step_plan(**kw) is not None
    assert layer_step_plan(**{**kw, "ffn_act": F.mish}) is None  # an activation the kernel does not know
    assert layer_step_plan(**{**kw, "out": (layer.retention.out_proj.weight.double(), None)}) is None  # mixed dtypes
    post_norm = make_model(torch.float32, pre_norm=False)
    post_norm.fast_decode = True
    with torch.inference_mode():  # a post-norm layer keeps its PyTorch step (and still decodes)
        out = post_norm(torch.tensor([[1, 2]]), mode="recurrent")
    assert torch.isfinite(out.logits).all()


def test_the_cached_plan_follows_replaced_and_updated_weights() -> None:
    model = make_model(torch.float32)
    tokens = torch.randint(0, 53, (1, 12), generator=torch.Generator().manual_seed(5))
    decode(model, tokens, fast=True)  # builds the plans
    with torch.no_grad():  # only an in-place change to a weight copied into the stacked q/k/v/g table
        model.decoder.layers[1].retention.v_proj.weight.mul_(-1.0)
    got, _ = decode(model, tokens, fast=True)
    want, _ = decode(copy.deepcopy(model).double(), tokens, fast=False)
    assert rel(got, want) < 1e-5, rel(got, want)
    with torch.no_grad():
        model.decoder.layers[1].ffn.fc2.weight.mul_(1.5)  # in place
        model.decoder.layers[0].retention.out_proj.weight = torch.nn.Parameter(
            torch.randn_like(model.decoder.layers[0].retention.out_proj.weight))  # replaced
        model.decoder.layers[0].retention.q_proj.weight.add_(0.1)  # into the stacked q/k/v/g copy
    got, _ = decode(model, tokens, fast=True)
    want, _ = decode(copy.deepcopy(model).double(), tokens, fast=False)
    assert rel(got, want) < 1e-5, rel(got, want)
    # A replaced submodule, and a replaced decay buffer, are seen too.
    norm = torch.nn.LayerNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model.decoder.layers[1].ffn_norm = norm
    model.decoder.layers[1].retention.gammas = model.decoder.layers[1].retention.gammas * 0.9
    got, _ = decode(model, tokens, fast=True)
    want, _ = decode(copy.deepcopy(model).double(), tokens, fast=False)
    assert rel(got, want) < 1e-5, rel(got, want)
    # So is a new dtype, and a whole state dict loaded in place.
    other = make_model(torch.float32, bias=False)
    model.load_state_dict(other.state_dict(), strict=False)
    model = model.to(torch.bfloat16)
    got, _ = decode(model, tokens, fast=True)
    want, _ = decode(copy.deepcopy(model).double(), tokens, fast=False)
    assert got.dtype == torch.bfloat16 and rel(got, want) < 2e-2, rel(got, want)


def test_kernels_reject_bad_shapes_with_the_argument_named() -> None:
    x = core_inputs(1, 2, 8, 8, torch.float32, "errors")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="proj must be"):
            torch.ops.yaretnet.retention_step(x["proj"][:, :-1], x["memory"], None, x["gamma"], None, None, EPS,
                                              True, 0)
        with pytest.raises(RuntimeError, match="memory must be"):
            torch.ops.yaretnet.retention_step(x["proj"], x["memory"].double(), None, x["gamma"], None, None, EPS,
                                              True, 0)
        with pytest.raises(RuntimeError, match="norm_weight must be"):
            torch.ops.yaretnet.retention_step(x["proj"], x["memory"], None, x["gamma"], x["w"][:-1], x["b"], EPS,
                                              False, 0)
        model = make_model(torch.float32)
        layer = model.decoder.layers[0]
        (weight, bias, gamma), _ = layer.decode_tables(torch.float32)
        r, f = layer.retention, layer.ffn
        args = [torch.zeros(1, 48), torch.zeros(1, 3, 16, 32), None, layer.retention_norm.weight,
                layer.retention_norm.bias, [weight], bias, gamma.view(-1), r.norm_weight, r.norm_bias,
                [r.out_proj.weight], r.out_proj.bias, layer.ffn_norm.weight, layer.ffn_norm.bias, [f.fc1.weight],
                f.fc1.bias, [f.fc2.weight], f.fc2.bias, 1e-5, 1e-5, False, False, 1, 2, False, 1.0]
        torch.ops.yaretnet.decoder_layer_step(*args)  # as the layer passes them: fine
        for i, parts in ((5, [weight[:-1]]), (5, [weight.double()]), (10, [r.out_proj.weight, r.out_proj.bias]),
                         (14, [f.fc1.weight.to(torch.uint8), f.fc1.bias, f.fc1.bias])):
            bad = list(args)
            bad[i] = parts
            name = {5: "qkvg_weight", 10: "out_weight", 14: "fc1_weight"}[i]
            with pytest.raises(RuntimeError, match=f"{name}"):
                torch.ops.yaretnet.decoder_layer_step(*bad)
        bad = list(args)
        bad[0] = torch.zeros(2, 48)
        with pytest.raises(RuntimeError, match=r"memory \(batch, heads, dk, dv\) of the same batch"):
            torch.ops.yaretnet.decoder_layer_step(*bad)
