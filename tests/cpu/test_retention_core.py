"""The fused layer core (``ops/cpu/csrc/retention_core.cpp``: split, rotation, chunkwise retention, head
norm and gate in one op) against float64: the op against the token-by-token recurrence of
``tests/reference.py``, and a whole layer through it against its float64 copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    reference_gammas,
    reference_msr,
    reference_retention,
    reference_rotate,
    rel_err,
)

from yet_another_retnet import MultiScaleRetention
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.decay import chunk_tables, resolve_log_decay
from yet_another_retnet.ops.position import rotation_tables
from yet_another_retnet.ops.retention_core import (
    retention_core,
    retention_core_applies,
    retention_core_reference,
)

EPS = 1e-5


def kernel_available() -> bool:
    return _extension.load() and hasattr(torch.library, "register_autograd")


def decay_tables(heads: int, chunk: int, dk: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    tables = chunk_tables(resolve_log_decay(None, heads, torch.device("cpu")), chunk, 1, dtype, dk**-0.5)
    return tables.inner, tables.query_decay, tables.key_decay, tables.chunk_decay.view(heads)


def float64_core(proj: torch.Tensor, positions: torch.Tensor | None, prev: torch.Tensor | None,
                 weight: torch.Tensor, bias: torch.Tensor, heads: int, dk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The core written out in float64: columns split, q and k rotated at ``positions``, retention
    by the recurrence, per-head LayerNorm with affine, swish gate."""
    batch, length, width = proj.shape
    dv = (width - 2 * heads * dk) // (2 * heads)
    q, k = (proj[..., i * heads * dk:(i + 1) * heads * dk].reshape(batch, length, heads, dk).transpose(1, 2)
            for i in (0, 1))
    v = proj[..., 2 * heads * dk:2 * heads * dk + heads * dv].reshape(batch, length, heads, dv).transpose(1, 2)
    z = proj[..., 2 * heads * dk + heads * dv:]
    if positions is not None:
        q, k = reference_rotate(q, positions), reference_rotate(k, positions)
    out, final = reference_retention(q, k, v, reference_gammas(heads), prev_state=prev)
    y = out.transpose(1, 2)  # (b, L, h, dv)
    mean = y.mean(-1, keepdim=True)
    y = ((y - mean) / torch.sqrt(((y - mean) ** 2).mean(-1, keepdim=True) + EPS)).reshape(batch, length, -1)
    return z * torch.sigmoid(z) * (y * weight + bias), final


CASES = [  # batch, length, heads, dk, dv, chunk, rotation ("shared", "per_row" or None), prev
    (2, 128, 2, 32, 32, 32, "shared", False),
    (2, 192, 2, 64, 32, 64, "per_row", True),
    (1, 96, 4, 32, 64, 32, None, True),
    (3, 64, 2, 32, 32, 64, "shared", False),  # one chunk
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_float64_recurrence(case: tuple) -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    batch, length, heads, dk, dv, chunk, rotation, with_prev = case
    gen = torch.Generator().manual_seed(length + heads + dk)
    proj = torch.randn(batch, length, 2 * heads * dk + 2 * heads * dv, generator=gen, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(heads * dv, generator=gen)).requires_grad_()
    bias = (0.3 * torch.randn(heads * dv, generator=gen)).requires_grad_()
    prev = torch.randn(batch, heads, dk, dv, generator=gen, requires_grad=True) if with_prev else None
    positions = None
    cos = sin = None
    if rotation is not None:
        offsets = torch.arange(batch)[:, None] * 7 if rotation == "per_row" else torch.zeros(1, 1, dtype=torch.long)
        positions = (offsets + 3 + torch.arange(length)).expand(batch, length)
        cos, sin = rotation_tables(positions if rotation == "per_row" else positions[:1], dk, torch.float32)
    tables = decay_tables(heads, chunk, dk, torch.float32)
    assert retention_core_applies(proj, cos, heads, dk, chunk, *tables)
    y, final = retention_core(proj, cos, sin, *tables, prev, weight, bias, EPS, heads, dk, chunk)
    assert "retention_core" in y.grad_fn.name()  # the kernel ran

    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in (proj, prev, weight, bias)]
    y64, final64 = float64_core(inputs64[0], positions, inputs64[1], inputs64[2], inputs64[3], heads, dk)
    assert rel_err(y, y64) < 1e-5 and rel_err(final, final64) < 1e-5
    grad_y, grad_final = torch.randn(y.shape, generator=gen), torch.randn(final.shape, generator=gen)
    torch.autograd.backward([y, final], [grad_y, grad_final])
    torch.autograd.backward([y64, final64], [grad_y.double(), grad_final.double()])
    for name, got, want in zip(("proj", "prev", "weight", "bias"), (proj, prev, weight, bias), inputs64, strict=True):
        if got is not None:
            assert rel_err(got.grad, want.grad) < 1e-5, name


def test_inference_gives_the_training_values_and_a_loss_only_backward() -> None:
    # Without autograd the op keeps nothing for a backward: same values. A backward from y alone
    # (no gradient reaching the final state) equals one with a zero final-state gradient.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(5)
    heads, dk, chunk = 2, 32, 32
    proj = torch.randn(2, 96, 4 * heads * dk, generator=gen, requires_grad=True)
    weight, bias = torch.ones(heads * dk, requires_grad=True), torch.zeros(heads * dk, requires_grad=True)
    cos, sin = rotation_tables(torch.arange(96)[None], dk, torch.float32)
    tables = decay_tables(heads, chunk, dk, torch.float32)
    with torch.no_grad():
        y0, final0 = retention_core(proj, cos, sin, *tables, None, weight, bias, EPS, heads, dk, chunk)
    y, final = retention_core(proj, cos, sin, *tables, None, weight, bias, EPS, heads, dk, chunk)
    torch.testing.assert_close(y0, y, rtol=0, atol=0)
    torch.testing.assert_close(final0, final, rtol=0, atol=0)
    grad_y = torch.randn(y.shape, generator=gen)
    (loss_only,) = torch.autograd.grad(y, proj, grad_y, retain_graph=True)
    (with_zero,) = torch.autograd.grad([y, final], proj, [grad_y, torch.zeros_like(final)])
    torch.testing.assert_close(loss_only, with_zero, rtol=0, atol=0)


def test_double_backward_goes_through_the_plain_forms() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(9)
    heads, dk, chunk = 2, 32, 32
    proj = torch.randn(1, 64, 4 * heads * dk, generator=gen, requires_grad=True)
    weight = (1 + 0.2 * torch.randn(heads * dk, generator=gen)).requires_grad_()
    bias = torch.zeros(heads * dk, requires_grad=True)
    cos, sin = rotation_tables(torch.arange(64)[None], dk, torch.float32)
    tables = decay_tables(heads, chunk, dk, torch.float32)
    tables64 = decay_tables(heads, chunk, dk, torch.float64)

    def grads_of_grads(fn, tabs, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        firsts = torch.autograd.grad(fn(*xs, tabs)[0].square().sum(), xs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in firsts), xs)

    def kernel(p, w, b, tabs):
        return retention_core(p, cos, sin, *tabs, None, w, b, EPS, heads, dk, chunk)

    def plain64(p, w, b, tabs):
        return retention_core_reference(p, cos.double(), sin.double(), *tabs, None, w, b, EPS, heads, dk, chunk)

    got = grads_of_grads(kernel, tables, proj, weight, bias)
    want = grads_of_grads(plain64, tables64, *(t.detach().double().requires_grad_() for t in (proj, weight, bias)))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-4


def test_applies_only_where_the_kernel_fits() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    heads, dk, chunk = 2, 32, 32
    tables = decay_tables(heads, chunk, dk, torch.float32)
    proj = torch.zeros(2, 64, 4 * heads * dk)
    assert retention_core_applies(proj, None, heads, dk, chunk, *tables)
    assert not retention_core_applies(proj[:, :50], None, heads, dk, chunk, *tables)  # not whole chunks
    assert not retention_core_applies(proj.double(), None, heads, dk, chunk, *tables)
    assert not retention_core_applies(proj, None, heads, dk, 16, *decay_tables(heads, 16, dk, torch.float32))
    trainable = tables[0].clone().requires_grad_()
    assert not retention_core_applies(proj, None, heads, dk, chunk, trainable, *tables[1:])


def test_kernel_rejects_bad_inputs() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    heads, dk, chunk = 2, 32, 32
    tables = decay_tables(heads, chunk, dk, torch.float32)
    weight, bias = torch.ones(heads * dk), torch.zeros(heads * dk)
    op = torch.ops.yaretnet.retention_core
    good = torch.zeros(1, 64, 4 * heads * dk)
    with pytest.raises(RuntimeError, match="multiple of chunk"):
        op(good[:, :50], None, None, *tables, None, weight, bias, EPS, heads, dk, chunk, False)
    with pytest.raises(RuntimeError, match="proj must be a float32"):
        op(good.double(), None, None, *tables, None, weight, bias, EPS, heads, dk, chunk, False)
    with pytest.raises(RuntimeError, match="last dim must be"):
        op(good[..., :-1], None, None, *tables, None, weight, bias, EPS, heads, dk, chunk, False)
    with pytest.raises(RuntimeError, match="norm_weight must be"):
        op(good, None, None, *tables, None, weight[:-1], bias, EPS, heads, dk, chunk, False)
    with pytest.raises(RuntimeError, match="prev must be"):
        op(good, None, None, *tables, torch.zeros(1, heads, dk, dk + 1), weight, bias, EPS, heads, dk, chunk, False)
    cos = torch.zeros(1, 63, dk)
    with pytest.raises(RuntimeError, match="cos must be"):
        op(good, cos, cos, *tables, None, weight, bias, EPS, heads, dk, chunk, False)


@pytest.mark.parametrize("with_state", [False, True])
def test_layer_through_the_core_equals_the_float64_layer(with_state: bool) -> None:
    # A retention layer whose chunkwise calls take the fused core (CPU float32, whole chunks of
    # 32) against the float64 recurrence, values and state; with_state: a second call from the
    # first one's state (positions go on). Parameter gradients against the layer's float64 copy
    # on the plain path.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    torch.manual_seed(1)
    layer = MultiScaleRetention(128, 2)  # dk = dv = 64
    with torch.no_grad():
        layer.norm_weight.add_(torch.randn(layer.value_dim) * 0.3)
        layer.norm_bias.add_(torch.randn(layer.value_dim) * 0.3)
    x = torch.randn(2, 128, 128)
    state = None
    if with_state:
        _, state = layer.forward_chunkwise(x[:, :64], x[:, :64], x[:, :64], chunk_size=32)
        x = x[:, 64:]
    with torch.profiler.profile() as prof:
        y, new_state = layer.forward_chunkwise(x, x, x, state, chunk_size=32)
    assert any("yaretnet::retention_core" in e.name for e in prof.events())  # the core ran
    want, memory = reference_msr(layer, x, start=64 if with_state else 0,
                                 prev_memory=None if state is None else state.memory.double())
    assert rel_err(y, want) < 1e-5 and rel_err(new_state.memory, memory) < 1e-5
    assert torch.equal(new_state.position, torch.full((2,), 128))
    if with_state:
        return
    layer64 = MultiScaleRetention(128, 2).double()
    layer64.load_state_dict(layer.state_dict())
    y64, state64 = layer64.forward_chunkwise(*(x.double(),) * 3, chunk_size=32)
    (y.square().sum() + new_state.memory.sum()).backward()
    (y64.square().sum() + state64.memory.sum()).backward()
    for name, p in layer.named_parameters():
        p64 = dict(layer64.named_parameters())[name]
        assert rel_err(p.grad, p64.grad) < 1e-4, name


def test_layer_falls_back_where_the_core_does_not_fit() -> None:
    # Lengths that are not whole chunks, padding and float64 take the step-by-step path: the same
    # values as the core where both apply.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    torch.manual_seed(2)
    layer = MultiScaleRetention(128, 2)
    x = torch.randn(2, 100, 128)
    with torch.profiler.profile() as prof:
        y, _ = layer.forward_chunkwise(x, x, x, chunk_size=32)
    assert not any("yaretnet::retention_core" in e.name for e in prof.events())
    assert rel_err(y, reference_msr(layer, x)[0]) < 1e-5
    y_core, _ = layer.forward_chunkwise(x[:, :96], x[:, :96], x[:, :96], chunk_size=32)
    assert rel_err(y_core, y[:, :96]) < 1e-5
    assert F.mse_loss(y_core, y[:, :96]).item() < 1e-10
