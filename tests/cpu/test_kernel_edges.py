"""Inputs at the edges of what the CPU kernels take: each gives the reference's answer (or the
reference runs instead), never a read past a tensor's storage or a silently dropped gradient."""

from __future__ import annotations

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.models.quantized import quantize_model
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.cpu.quantized import (
    dequantize_int4,
    qlinear,
    qlinear_int4,
    qlinear_int4_reference,
    qlinear_reference,
    quantize_int4,
    quantize_int8,
)
from yet_another_retnet.ops.cpu.split_heads import split_heads, split_heads_reference
from yet_another_retnet.ops.position import rotation_tables

pytestmark = pytest.mark.skipif(not _extension.load(), reason="the C++ extension is not built here")


def test_transpose_copy_of_a_row_broadcast_matrix() -> None:
    # expand() gives a row stride of 0: read as packed rows it ran past the storage (NaN weight
    # gradients through the oneDNN backend; a segfault at size).
    row = torch.randn(1, 64)
    x = row.expand(100, 64)
    assert torch.equal(torch.ops.yaretnet.transpose_copy(x), x.t().contiguous())


@pytest.mark.parametrize("top", [1e-36, 1e-33, 1e-20])
def test_integer_products_of_tiny_activations(top: float) -> None:
    # 32767 / max|x| overflowed to inf below ~1e-34: zeros became NaN, the rest saturated.
    torch.manual_seed(0)
    x = torch.zeros(2, 256)
    x[0, 3], x[0, 10], x[1, 7] = top, -top / 2, top / 3
    w = torch.randn(48, 256)
    q, s = quantize_int8(w)
    want = qlinear_reference(x.double(), q, s.double())
    got = qlinear(x, q, s)
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    packed, scale, low = quantize_int4(w, 128)
    want4 = qlinear_int4_reference(x.double(), packed, scale.double(), low.double())
    got4 = qlinear_int4(x, packed, scale, low)
    assert torch.allclose(got4.double(), want4, rtol=1e-3, atol=1e-3 * float(want4.abs().max()))


def test_int4_groups_spanning_the_float32_range() -> None:
    # max - min of +-2e38 overflowed float32: the group's scale became inf and its weights NaN,
    # silently. Refused by name; a group that spans less still round-trips.
    w = torch.randn(4, 256)
    w[2, 130], w[2, 131] = 2e38, -2e38
    with pytest.raises(ValueError, match="row 2, group 1"):
        quantize_int4(w, 128)
    w[2, 130], w[2, 131] = 1e38, -1e38
    packed, scale, low = quantize_int4(w, 128)
    back = dequantize_int4(packed, scale, low, 256)
    assert torch.isfinite(back).all() and float(back[2, 130]) == pytest.approx(1e38, rel=1e-5)


@pytest.mark.parametrize("which", ["cos", "sin"])
def test_split_heads_differentiates_either_rotation_table(which: str) -> None:
    heads, dk, dv = 3, 8, 16
    proj = torch.randn(2, 5, 2 * heads * dk + 2 * heads * dv, requires_grad=True)
    cos, sin = rotation_tables(torch.arange(5)[None].expand(2, 5), dk, torch.float32)
    tables = {"cos": cos.clone(), "sin": sin.clone()}
    tables[which].requires_grad_(True)
    out = split_heads(proj, tables["cos"], tables["sin"], heads, dk)
    sum(o.float().pow(2).sum() for o in out).backward()
    got = tables[which].grad
    assert got is not None
    ref = {"cos": cos.clone(), "sin": sin.clone()}
    ref[which].requires_grad_(True)
    proj_ref = proj.detach().clone().requires_grad_(True)
    sum(o.float().pow(2).sum() for o in split_heads_reference(proj_ref, ref["cos"], ref["sin"], heads, dk)).backward()
    assert torch.allclose(got, ref[which].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_prompt_products_follow_a_reloaded_state(method: str) -> None:
    # The stacked q/k/v/g copies were keyed by storage alone: load_state_dict into the same
    # buffers kept the old weights in a short prompt's products.
    def model(seed: int) -> RetNet:
        torch.manual_seed(seed)
        return quantize_model(RetNet(RetNetConfig.from_preset("tiny", num_layers=2, dropout=0.0)).eval(), method)

    a, b = model(0), model(1)
    ids = torch.randint(0, 256, (1, 7))
    with torch.inference_mode():
        a.prefill(ids)  # a short prompt: the stacked quantized products, cached
        a.load_state_dict(b.state_dict())
        got = a.prefill(ids).logits
        want = b.prefill(ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
