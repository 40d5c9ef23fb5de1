"""The one dispatch of the fast routes (layers/fast.py), the decoding plan (models/decoding.py),
the one switch ``use_fast_path`` and its deprecated aliases, and the single sources of the key
scale, the RMS norm and the rotation (ops/norms.py, ops/position.py).

Every fast route is checked against the same layer with ``use_fast_path=False`` (the reference
ops, themselves checked against tests/reference.py elsewhere); the rotation layouts against
:func:`apply_rotation`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.layers import fast
from yet_another_retnet.layers.retention import MultiScaleRetention
from yet_another_retnet.models import decoding
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.norms import key_scale, rms_normalize
from yet_another_retnet.ops.position import (
    apply_rotation,
    half_tables,
    rotate_halves,
    rotate_heads,
    rotation_factors,
    rotation_tables,
    to_halves,
)


def make_layer(dtype: torch.dtype = torch.float64, **kw: Any) -> MultiScaleRetention:
    torch.manual_seed(0)
    layer = MultiScaleRetention(64, 2, dtype=dtype, **kw).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def route_of(layer: MultiScaleRetention, x: torch.Tensor, mode: str, *, cross: bool = False,
             memory: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
             chunk_size: int | None = 4) -> str:
    key = x.clone() if cross else x
    return fast.pick_route(layer, x, key, x, memory, mode, chunk_size, token_mask)


def test_the_route_table_picks_each_route_on_its_conditions() -> None:
    layer = make_layer()
    x = torch.randn(2, 8, 64, dtype=torch.float64)
    assert route_of(layer, x, "parallel") == fast.FUSED
    assert route_of(layer, x, "chunkwise") == fast.CORE  # the paper's layer: the core kernel is tried
    assert route_of(layer, x, "recurrent") == fast.REFERENCE
    assert route_of(layer, x, "parallel", cross=True) == fast.REFERENCE
    assert route_of(layer, x, "chunkwise", token_mask=torch.ones(2, 8, dtype=torch.bool)) == fast.FUSED
    assert route_of(layer, x, "chunkwise", memory=torch.zeros(2, 2, 32, 64, dtype=torch.float64)) == fast.FUSED
    assert route_of(layer, x, "chunkwise", chunk_size=0) == fast.FUSED  # the reference forms name the error
    assert route_of(make_layer(head_norm="rmsnorm"), x, "chunkwise") == fast.FUSED
    assert route_of(make_layer(gate_activation="gelu"), x, "chunkwise") == fast.FUSED
    assert route_of(make_layer(use_fast_path=False), x, "parallel") == fast.REFERENCE
    half = make_layer(torch.bfloat16)
    assert route_of(half, x.to(torch.bfloat16), "chunkwise") == fast.REFERENCE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert route_of(layer, x, "parallel") == fast.REFERENCE
    # A compiled form (compile_chunkwise) wins in chunkwise mode; with keep_kernel_calls it yields
    # to the CPU kernels for CPU float32 where they are built.
    layer.__dict__["_compiled_chunkwise"] = (lambda *a: None, False)
    assert route_of(layer, x, "chunkwise") == fast.COMPILED
    assert route_of(layer, x, "parallel") == fast.FUSED
    assert route_of(layer, x[:, :0], "chunkwise") == fast.CORE
    layer32 = make_layer(torch.float32)
    layer32.__dict__["_compiled_chunkwise"] = (lambda *a: None, True)
    want = fast.CORE if _extension.load() else fast.COMPILED
    assert route_of(layer32, x.float(), "chunkwise") == want
    assert route_of(layer, x, "chunkwise") == fast.COMPILED  # float64: not the kernels' dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
@pytest.mark.parametrize("padded", [False, True])
def test_every_route_gives_the_reference_numbers(dtype: torch.dtype, mode: str, padded: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(dtype)
    x = torch.randn(2, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones(2, 64, dtype=torch.bool)
        mask[0, :5] = False
    routes: list[str] = []
    pick = fast.pick_route

    def spy(*args: Any) -> str:
        routes.append(pick(*args))
        return routes[-1]

    monkeypatch.setattr(fast, "pick_route", spy)
    cores: list[int] = []
    core = fast.retention_core
    monkeypatch.setattr(fast, "retention_core", lambda *a: cores.append(1) or core(*a))
    y, state, _ = layer.retain(x, x, x, None, mode, chunk_size=32, token_mask=mask)
    layer.use_fast_path = False
    want, want_state, _ = layer.retain(x, x, x, None, mode, chunk_size=32, token_mask=mask)
    assert routes == [fast.CORE if mode == "chunkwise" and not padded else fast.FUSED, fast.REFERENCE]
    # The core kernel runs only on its route, and only for CPU float32 (else the route goes on fused).
    on_core = routes[0] == fast.CORE and dtype == torch.float32
    assert len(cores) <= int(on_core)
    if on_core and _extension.load() and _extension.HAS_REGISTER_AUTOGRAD and torch.get_num_threads() in (1, 2, 4):
        # (4 walks spread evenly; the kernel's backward needs torch >= 2.4)
        assert cores == [1]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel(y, want) < tol and rel(state.memory, want_state.memory) < tol
    assert torch.equal(state.position, want_state.position)


def make_model(dtype: torch.dtype = torch.float32, **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": 37, "d_model": 64, "num_heads": 2, "num_layers": 2, "ffn_dim": 96,
                              "dropout": 0.0, "chunk_size": 4, "ffn": "glu", "bias": True}
    fields.update(overrides)
    torch.manual_seed(0)
    return RetNet(RetNetConfig(**fields)).to(dtype).eval()


def decode(model: RetNet, steps: int = 3) -> list[torch.Tensor]:
    ids = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(ids[:, :3], mode="chunkwise")
        logits = []
        for t in range(3, 3 + steps):
            out = model(ids[:, t : t + 1], state=out.state, mode="recurrent")
            logits.append(out.logits)
    return logits


def reference_decode(model: RetNet) -> list[torch.Tensor]:
    with pytest.warns(DeprecationWarning):
        model.fast_decode = False
    try:
        return decode(model)
    finally:
        with pytest.warns(DeprecationWarning):
            model.fast_decode = True


def test_the_decoding_plan_is_kept_while_the_weights_stay_and_rebuilt_when_they_change() -> None:
    model = make_model()
    decode(model)
    plan = model.decoder.__dict__["_decoding_plan"]
    assert plan.dtype == torch.float32 and len(plan.tables) == 2
    decode(model)
    assert model.decoder.__dict__["_decoding_plan"] is plan  # built once, when decoding started
    retention = model.decoder.layers[0].retention
    # An in-place update (an optimiser step): a new plan whose stacked weights are the new ones.
    with torch.no_grad():
        retention.k_proj.weight.mul_(1.5)
    got = decode(model)
    new = model.decoder.__dict__["_decoding_plan"]
    assert new is not plan
    dk = retention.embed_dim
    assert torch.equal(new.tables[0][0][0][dk : 2 * dk], retention.k_proj.weight)
    assert max(rel(a, b) for a, b in zip(got, reference_decode(model), strict=True)) < 1e-5
    # A replaced parameter, a replaced submodule, and a dtype change each rebuild it.
    for change in ("parameter", "module", "dtype"):
        before = model.decoder.__dict__["_decoding_plan"]
        if change == "parameter":
            model.decoder.layers[1].ffn.gate.bias = torch.nn.Parameter(torch.randn(96))
        elif change == "module":
            model.decoder.layers[1].retention.out_proj = torch.nn.Linear(128, 64)
        else:
            model.double()
        got = decode(model)
        after = model.decoder.__dict__["_decoding_plan"]
        assert after is not before, change
        tol = 1e-10 if change == "dtype" else 1e-5
        assert max(rel(a, b) for a, b in zip(got, reference_decode(model), strict=True)) < tol, change
    assert model.decoder.__dict__["_decoding_plan"].dtype == torch.float64
    model.release_decode_cache()
    assert "_decoding_plan" not in model.decoder.__dict__


def test_use_fast_path_is_one_switch_and_the_old_names_warn_but_still_work() -> None:
    config = RetNetConfig(vocab_size=37, d_model=64, num_heads=2, num_layers=2, ffn_dim=96)
    off = RetNet(config, use_fast_path=False)
    assert not off.use_fast_path
    assert all(not m.use_fast_path for m in off.modules() if isinstance(m, MultiScaleRetention))
    model = make_model()
    assert model.use_fast_path and all(
        m.use_fast_path for m in model.modules() if isinstance(m, MultiScaleRetention))
    calls: list[int] = []
    run_layers = decoding.run_layers
    mp = pytest.MonkeyPatch()
    mp.setattr(decoding, "run_layers", lambda *a: calls.append(1) or run_layers(*a))
    try:
        decode(model, steps=2)
        assert len(calls) == 2  # the fast step
        model.use_fast_path = False
        assert all(not m.use_fast_path for m in model.modules() if isinstance(m, MultiScaleRetention))
        with pytest.warns(DeprecationWarning, match="use_fast_path"):
            assert model.fast_decode is False
        decode(model, steps=2)
        assert len(calls) == 2  # the reference step
        model.use_fast_path = True
        # fast_decode keeps its old meaning: the decoding step alone.
        with pytest.warns(DeprecationWarning, match="use_fast_path"):
            model.fast_decode = False
        assert all(m.use_fast_path for m in model.modules() if isinstance(m, MultiScaleRetention))
        decode(model, steps=2)
        assert len(calls) == 2
        with pytest.warns(DeprecationWarning):
            model.fast_decode = True
        decode(model, steps=2)
        assert len(calls) == 4
    finally:
        mp.undo()
    layer = make_layer()
    with pytest.warns(DeprecationWarning, match="use_fast_path"):
        layer.fast_path = False
    assert layer.use_fast_path is False
    with pytest.warns(DeprecationWarning):
        assert layer.fast_path is False
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    assert route_of(layer, x, "parallel") == fast.REFERENCE


def test_one_key_scale_one_rms_norm_and_the_rotation_layouts_agree() -> None:
    assert key_scale(64) == 64**-0.5 and key_scale(6) == 6**-0.5
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    want = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(rms_normalize(x, 1e-6), want, rtol=1e-12, atol=0)
    heads, dk, length = 3, 8, 7
    positions = torch.arange(length) + 5
    cos, sin = (t[None, None] for t in rotation_tables(positions, dk, torch.float64))  # (1, 1, L, dk)
    t = torch.randn(2, length, heads * dk, dtype=torch.float64)
    per_head = t.unflatten(-1, (heads, dk)).transpose(1, 2)  # (b, h, L, dk)
    want = apply_rotation(per_head, cos, sin).transpose(1, 2).flatten(-2)
    assert torch.allclose(rotate_heads(t, cos, sin), want, rtol=0, atol=1e-12)
    c, s = half_tables(cos, sin)
    halves = rotate_halves(to_halves(t, heads).unflatten(-1, (heads, 2, dk // 2)), c[:, :, None], s[:, :, None])
    assert torch.allclose(halves.flatten(-3), to_halves(want, heads), rtol=0, atol=1e-12)
    # The decoding factors: the query's rotation, and the key's times the key scale.
    factors = rotation_factors(positions, dk, torch.float64)  # (L, 2, dk/2)
    pairs = torch.view_as_complex(per_head[0, 0].contiguous().view(length, dk // 2, 2))
    q = torch.view_as_real(pairs * factors[:, 0]).flatten(-2)
    k = torch.view_as_real(pairs * factors[:, 1]).flatten(-2)
    assert torch.allclose(q, want.unflatten(-1, (heads, dk))[0, :, 0], rtol=0, atol=1e-12)
    assert torch.allclose(k, key_scale(dk) * want.unflatten(-1, (heads, dk))[0, :, 0], rtol=0, atol=1e-12)
