"""MultiScaleRetention: three forms, state hand-offs, and a float64 reference of the whole layer.

``reference_msr`` (tests/reference.py) rebuilds the layer from its weights with its own
projections, rotation, token-by-token recurrence, head norm, swish gate and output projection,
so a bug shared by the layer's forms cannot hide behind their agreement.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import F64, reference_gammas, reference_msr, rel_err

from yet_another_retnet.layers.retention import (
    MultiheadRetention,
    MultiScaleRetention,
    RetentionState,
)
from yet_another_retnet.ops.position import rotation_tables, rotation_tables_from_zero

TOL64 = 1e-10


def make_layer(seed=0, embed_dim=16, num_heads=2, dtype=F64, **kw):
    torch.manual_seed(seed)
    layer = MultiScaleRetention(embed_dim, num_heads, dtype=dtype, **kw)
    # Non-trivial biases and norm affine, so a path that ignores them cannot pass.
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return layer


def inputs(batch, length, dim, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=gen, dtype=F64).to(dtype)


def run_form(layer, form, x, state=None, chunk_size=3):
    """Run ``x`` ``(batch, L, d)`` through ``form`` from ``state``; returns (y, state)."""
    if form == "parallel":
        # forward_parallel returns (y, weights); retain() is the same path and also returns the
        # state, which is what a model's prefill hands to later calls.
        y, state_out, _ = layer.retain(x, x, x, state, "parallel")
        y_public, _ = layer.forward_parallel(x, x, x, state)
        torch.testing.assert_close(y, y_public, rtol=0, atol=0)
        return y, state_out
    if form == "chunkwise":
        return layer.forward_chunkwise(x, x, x, state, chunk_size=chunk_size)
    if form == "recurrent":
        ys = []
        for t in range(x.shape[1]):
            y, state = layer.forward_recurrent(x[:, t], x[:, t], x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), state
    raise AssertionError(form)


FORMS = ("parallel", "chunkwise", "recurrent")


@pytest.mark.parametrize(
    ("head_norm", "relative_position", "value_factor", "bias"),
    list(itertools.product(("groupnorm", "rmsnorm"), (True, False), (1.0, 2.0), (False, True))),
)
def test_every_form_matches_float64_layer_reference(head_norm, relative_position, value_factor, bias):
    layer = make_layer(
        head_norm=head_norm, relative_position=relative_position, value_factor=value_factor, bias=bias
    )
    x = inputs(2, 11, 16)
    ref_y, ref_memory = reference_msr(layer, x)
    for form in FORMS:
        y, state = run_form(layer, form, x)
        assert y.shape == (2, 11, 16) and y.dtype == F64
        assert rel_err(y, ref_y) <= TOL64, form
        assert rel_err(state.memory, ref_memory) <= TOL64, form
        assert state.position.tolist() == [11, 11]


def test_log_spaced_and_custom_decay_layer():
    for decay in ("log-spaced", torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=F64)):
        layer = make_layer(embed_dim=32, num_heads=4, decay=decay)
        if isinstance(decay, str):
            torch.testing.assert_close(layer.gammas, reference_gammas(4, decay), rtol=0, atol=1e-15)
        x = inputs(1, 14, 32, seed=3)
        ref_y, _ = reference_msr(layer, x)
        for form in FORMS:
            assert rel_err(run_form(layer, form, x)[0], ref_y) <= TOL64


def test_rotation_matters():
    """A reference without rotation must disagree with a rotating layer: the check has teeth."""
    layer = make_layer()
    x = inputs(1, 9, 16)
    y, _ = layer.forward_parallel(x, x, x)
    layer.relative_position = False
    unrotated, _ = reference_msr(layer, x)
    assert rel_err(y, unrotated) > 1e-3


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_shared_rotation_table_first_built_under_inference_mode_serves_training(dtype):
    """Rows counting from 0 share one cached table. Built first under inference_mode (a prompt),
    it must still be a plain tensor: a training step saves it for its backward."""
    rotation_tables_from_zero.cache_clear()
    layer = make_layer(embed_dim=64, num_heads=2, dtype=dtype)
    x = inputs(2, 11, 64, dtype=dtype)
    with torch.inference_mode():
        first, _ = layer.forward_chunkwise(x, x, x, chunk_size=4)
    cos, sin = rotation_tables_from_zero(11, layer.key_dim, dtype, x.device)
    assert not cos.is_inference() and not sin.is_inference()
    want_cos, want_sin = rotation_tables(torch.arange(11), layer.key_dim, dtype)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    y, _ = layer.forward_chunkwise(x, x, x, chunk_size=4)  # the cached table, now with autograd
    y.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    torch.testing.assert_close(y.detach(), first)
    ref_y, _ = reference_msr(layer, x.to(F64))
    assert rel_err(y, ref_y) < (TOL64 if dtype == F64 else 1e-5)


@pytest.mark.parametrize(("first", "second"), list(itertools.product(FORMS, FORMS)))
def test_state_hand_off_between_any_forms(first, second):
    layer = make_layer(embed_dim=16, num_heads=2)
    x = inputs(2, 20, 16, seed=7)
    ref_y, ref_memory = reference_msr(layer, x)
    y1, state = run_form(layer, first, x[:, :7], chunk_size=3)
    assert state.position.tolist() == [7, 7]
    y2, state = run_form(layer, second, x[:, 7:], state, chunk_size=4)
    assert rel_err(torch.cat((y1, y2), dim=1), ref_y) <= TOL64
    assert rel_err(state.memory, ref_memory) <= TOL64
    assert state.position.tolist() == [20, 20]


def test_long_chain_of_calls_in_every_form():
    layer = make_layer(embed_dim=16, num_heads=4, head_norm="rmsnorm", relative_position=True)
    x = inputs(1, 40, 16, seed=9)
    ref_y, _ = reference_msr(layer, x)
    ys, state, start = [], None, 0
    for form, size in zip(itertools.cycle(FORMS), (5, 1, 3, 9, 2, 1, 12, 7), strict=False):
        y, state = run_form(layer, form, x[:, start : start + size], state, chunk_size=2)
        ys.append(y)
        start += size
    assert start == 40
    assert rel_err(torch.cat(ys, dim=1), ref_y) <= TOL64


@settings(max_examples=20, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    forms=st.lists(st.sampled_from(FORMS), min_size=4, max_size=4),
    chunk=st.integers(1, 10),
    head_norm=st.sampled_from(["groupnorm", "rmsnorm"]),
    seed=st.integers(0, 2**16),
)
def test_property_layer_any_split_any_forms(heads, sizes, forms, chunk, head_norm, seed):
    layer = make_layer(seed=seed, embed_dim=16, num_heads=heads, head_norm=head_norm)
    x = inputs(1, sum(sizes), 16, seed=seed)
    ref_y, ref_memory = reference_msr(layer, x)
    ys, state, start = [], None, 0
    for form, size in zip(forms, sizes, strict=False):
        y, state = run_form(layer, form, x[:, start : start + size], state, chunk_size=chunk)
        ys.append(y)
        start += size
    assert rel_err(torch.cat(ys, dim=1), ref_y) <= TOL64
    assert rel_err(state.memory, ref_memory) <= TOL64
    assert state.position.tolist() == [start]


def test_rows_at_different_positions():
    """The state carries each row's own position: a batch of rows at different offsets."""
    layer = make_layer(embed_dim=16, num_heads=2)
    a, b = inputs(1, 12, 16, seed=11), inputs(1, 12, 16, seed=12)
    _, sa = layer.forward_chunkwise(a[:, :3], a[:, :3], a[:, :3], chunk_size=2)
    _, sb = layer.forward_chunkwise(b[:, :8], b[:, :8], b[:, :8], chunk_size=2)
    state = RetentionState(torch.cat((sa.memory, sb.memory)), torch.cat((sa.position, sb.position)))
    nxt = torch.cat((a[:, 3:7], b[:, 8:12]))
    for form in FORMS:
        y, out_state = run_form(layer, form, nxt, state)
        assert out_state.position.tolist() == [7, 12]
        assert rel_err(y[:1], reference_msr(layer, a[:, :7])[0][:, 3:]) <= TOL64, form
        assert rel_err(y[1:], reference_msr(layer, b)[0][:, 8:]) <= TOL64, form


def test_forward_is_self_retention_and_readme_alias():
    assert MultiheadRetention is MultiScaleRetention
    layer = make_layer()
    x = inputs(2, 6, 16)
    y, weights = layer(x, need_weights=True)
    assert weights is not None and weights.shape == (2, 2, 6, 6)
    assert rel_err(y, reference_msr(layer, x)[0]) <= TOL64


def test_gradients_equal_across_layer_forms():
    layer = make_layer(embed_dim=16, num_heads=2, bias=True)
    x0 = inputs(2, 9, 16, seed=13)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 9, 16, generator=gen, dtype=F64)
    wm = torch.randn(2, 2, 8, 16, generator=gen, dtype=F64)
    params = list(layer.parameters())
    results = {}
    for form in FORMS:
        x = x0.clone().requires_grad_(True)
        y, state = run_form(layer, form, x)
        loss = (y * w).sum() + (state.memory * wm).sum()
        results[form] = torch.autograd.grad(loss, [x, *params])
    for form in ("chunkwise", "recurrent"):
        for g, e in zip(results[form], results["parallel"], strict=True):
            assert rel_err(g, e) <= 1e-9, form


def test_gradcheck_layer_chunkwise():
    layer = make_layer(embed_dim=8, num_heads=2, value_factor=1.0)
    x = inputs(1, 5, 8).requires_grad_(True)

    def fn(x):
        y, state = layer.forward_chunkwise(x, x, x, chunk_size=2)
        return y, state.memory

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer(dtype):
    torch.manual_seed(0)
    layer = MultiScaleRetention(64, 8).to(dtype)
    # The decay rates survive the cast: bfloat16 would round head 8's 1 - 2^-12 to exactly 1.
    assert layer.gammas.dtype == F64
    assert layer.gammas[7].item() == 1 - 2**-12
    assert torch.tensor(1 - 2**-12, dtype=torch.bfloat16).item() == 1.0
    assert layer.q_proj.weight.dtype == dtype

    x = inputs(1, 4096, 64, seed=17, dtype=dtype)
    ref_y, _ = reference_msr(layer, x)  # float64 copy of the same (rounded) weights and input
    y, state = layer.forward_chunkwise(x, x, x, chunk_size=256)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert rel_err(y, ref_y) <= 2e-2
    y, _ = layer.forward_parallel(x[:, :1024], x[:, :1024], x[:, :1024])
    assert bool(torch.isfinite(y).all()) and rel_err(y, ref_y[:, :1024]) <= 2e-2
    ys, st = [], state
    for t in range(64):  # recurrent steps continuing the chunkwise state
        yt, st = layer.forward_recurrent(x[:, t], x[:, t], x[:, t], st)
        ys.append(yt)
    assert bool(torch.isfinite(torch.stack(ys)).all())
    # The last 64 tokens by the models' fast decode step, from a chunkwise prefix.
    with torch.no_grad():
        _, st = layer.eval().forward_chunkwise(x[:, :4032], x[:, :4032], x[:, :4032], chunk_size=256)
        memory, position, ys = st.memory, st.position, []
        for t in range(4032, 4096):
            yt, memory = layer.step(x[:, t], memory, layer.step_rotation(position, memory.dtype))
            ys.append(yt)
            position = position + 1
    assert memory.dtype == torch.float32
    assert rel_err(torch.stack(ys, dim=1), ref_y[:, 4032:]) <= 2e-2

    # The layer in half precision still decays head 8: after one token then 4,095 zero tokens
    # (no bias, so zero keys and values), the memory must shrink by gamma^4095 ~ 0.37, not 1.
    one = inputs(1, 1, 64, seed=19, dtype=dtype)
    _, s1 = layer.forward_chunkwise(one, one, one)
    zeros = torch.zeros(1, 4095, 64, dtype=dtype)
    _, s2 = layer.forward_chunkwise(zeros, zeros, zeros, s1, chunk_size=512)
    ratio = (s2.memory[0, 7].norm() / s1.memory[0, 7].norm()).item()
    assert ratio == pytest.approx((1 - 2**-12) ** 4095, rel=1e-4)


def test_layer_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        MultiScaleRetention(30, 4)
    with pytest.raises(ValueError, match="key head dim"):
        MultiScaleRetention(12, 4)  # key head dim 3 cannot be rotated in pairs
    MultiScaleRetention(12, 4, relative_position=False)  # fine without rotation
    with pytest.raises(ValueError, match="embed_dim"):
        MultiScaleRetention(0, 1)
    with pytest.raises(ValueError, match="value_factor"):
        MultiScaleRetention(16, 2, value_factor=0.3)
    with pytest.raises(ValueError, match="head_norm"):
        MultiScaleRetention(16, 2, head_norm="batchnorm")
    with pytest.raises(ValueError, match="decay"):
        MultiScaleRetention(16, 2, decay="linear")
    layer = make_layer()
    x = inputs(2, 5, 16)
    with pytest.raises(ValueError, match="query"):
        layer.forward_parallel(x[0], x[0], x[0])
    with pytest.raises(ValueError, match=r"query.*embed_dim=16"):
        layer.forward_chunkwise(x[..., :8], x[..., :8], x[..., :8])
    with pytest.raises(ValueError, match="key"):
        layer.forward_parallel(x, x[:, :3], x)
    with pytest.raises(ValueError, match="query"):
        layer.forward_recurrent(x, x, x)
    with pytest.raises(TypeError, match=r"query.*floating"):
        layer.forward_parallel(x.long(), x, x)
    with pytest.raises(ValueError, match="chunk_size"):
        layer.forward_chunkwise(x, x, x, chunk_size=0)
    with pytest.raises(TypeError, match="prev_state"):
        layer.forward_chunkwise(x, x, x, torch.zeros(2, 2, 8, 16, dtype=F64))
    _, state = layer.forward_chunkwise(x, x, x)
    bad = RetentionState(state.memory[:1], state.position)
    with pytest.raises(ValueError, match=r"prev_state\.memory"):
        layer.forward_chunkwise(x, x, x, bad)
    bad = RetentionState(state.memory, state.position[:1])
    with pytest.raises(ValueError, match=r"prev_state\.position"):
        layer.forward_recurrent(x[:, 0], x[:, 0], x[:, 0], bad)


@pytest.mark.parametrize(
    ("head_norm", "relative_position", "bias"),
    [("groupnorm", True, False), ("rmsnorm", True, True), ("groupnorm", False, True)],
)
def test_fast_decode_step_matches_reference(head_norm, relative_position, bias):
    """``step`` (the models' single-token decode path) continues a chunkwise state exactly."""
    layer = make_layer(head_norm=head_norm, relative_position=relative_position, bias=bias).eval()
    x = inputs(2, 14, 16, seed=23)
    ref_y, ref_memory = reference_msr(layer, x)
    with torch.no_grad():
        _, state = layer.forward_chunkwise(x[:, :6], x[:, :6], x[:, :6], chunk_size=4)
        memory, position, ys = state.memory, state.position, []
        for t in range(6, 14):
            y, memory = layer.step(x[:, t], memory, layer.step_rotation(position, memory.dtype))
            ys.append(y)
            position = position + 1
    assert rel_err(torch.stack(ys, dim=1), ref_y[:, 6:]) <= TOL64
    assert rel_err(memory, ref_memory) <= TOL64


@pytest.mark.parametrize(
    ("relative_position", "value_factor", "bias"),
    list(itertools.product((True, False), (1.0, 2.0), (False, True))),
)
def test_absorb_gives_the_float64_reference_state(relative_position, value_factor, bias):
    layer = make_layer(relative_position=relative_position, value_factor=value_factor, bias=bias)
    x = inputs(2, 13, 16, seed=4)
    _, ref_memory = reference_msr(layer, x)
    state = layer.absorb(x, None)
    assert rel_err(state.memory, ref_memory) <= TOL64
    assert state.position.tolist() == [13, 13]
    # From a state: the second half of the same sequence.
    first = layer.absorb(x[:, :6], None)
    second = layer.absorb(x[:, 6:], first)
    assert rel_err(second.memory, ref_memory) <= TOL64
    assert second.position.tolist() == [13, 13]


def test_absorb_skips_left_padding_like_retain():
    layer = make_layer()
    x = inputs(2, 9, 16, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    _, expected, _ = layer.retain(x, x, x, None, "chunkwise", 4, token_mask=mask)
    state = layer.absorb(x, None, token_mask=mask)
    assert rel_err(state.memory, expected.memory) <= TOL64
    assert state.position.tolist() == [5, 9]
    # The padded row's state is the one its real tokens give alone.
    _, alone = reference_msr(layer, x[:1, 4:])
    assert rel_err(state.memory[:1], alone) <= TOL64


def test_absorb_in_float32_over_a_long_input_matches_chunkwise():
    # One decay-weighted product over 3,000 tokens: the far decay powers are zeroed rather than
    # left subnormal, which must not change the state measurably.
    layer = make_layer(embed_dim=32, num_heads=4, dtype=torch.float32)
    x = inputs(1, 3000, 32, seed=6, dtype=torch.float32)
    _, expected = layer.forward_chunkwise(x, x, x, None, chunk_size=256)
    state = layer.absorb(x, None)
    torch.testing.assert_close(state.memory, expected.memory, rtol=1e-4, atol=1e-5)
