"""The decoding ops' schemas and shape-only forms, checked by ``torch.library.opcheck``: each
op's schema says what it mutates and what its outputs alias, its fake (meta) form gives the shapes
the kernel gives, and it traces under ``torch.compile``'s dispatch (what a graph holding the op
would run)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from yet_another_retnet.ops.cpu import _extension
from yet_another_retnet.ops.cpu.quantized import quantize_int4, quantize_int8

pytestmark = [pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck is torch >= 2.4"),
              pytest.mark.skipif(not _extension.load(), reason="the C++ extension is not built here")]

H, DK, DV, D, FFN = 2, 16, 32, 24, 40


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _step_args(batch: int) -> tuple[Any, ...]:
    g = _gen()
    proj = torch.randn(batch, 2 * H * (DK + DV), generator=g)
    memory = torch.randn(batch, H, DK, DV, generator=g)
    rotation = torch.randn(batch, 2, DK // 2, 2, generator=g)
    return proj, memory, rotation, torch.full((H,), 0.9), torch.ones(H * DV), None, 1e-5, True, 1


def _layer_args(batch: int, product: str) -> tuple[Any, ...]:
    g = _gen()

    def weight(rows: int, cols: int) -> list[torch.Tensor]:
        w = torch.randn(rows, cols, generator=g) / cols**0.5
        if product == "int8":
            return list(quantize_int8(w))
        if product == "int4":
            return list(quantize_int4(w, 32))
        return [w]

    x = torch.randn(batch, D, generator=g)
    memory = torch.randn(batch, H, DK, DV, generator=g)
    ones = torch.ones(D)
    return (x, memory, None, ones, None, weight(2 * H * (DK + DV), D), None, torch.full((H,), 0.9), None, None,
            weight(D, H * DV), None, ones, None, weight(FFN, D), None, weight(D, FFN), None,
            1e-5, 1e-5, True, True, 1, 2, False, 1.0)


@pytest.mark.parametrize("batch", [1, 3])
def test_retention_step_ops(batch: int) -> None:
    torch.library.opcheck(torch.ops.yaretnet.retention_step.default, _step_args(batch))
    torch.library.opcheck(torch.ops.yaretnet.retention_step_inplace.default, _step_args(batch))


@pytest.mark.parametrize("product", ["dense", "int8", "int4"])
def test_decoder_layer_step_ops(product: str) -> None:
    torch.library.opcheck(torch.ops.yaretnet.decoder_layer_step.default, _layer_args(2, product))
    torch.library.opcheck(torch.ops.yaretnet.decoder_layer_step_inplace.default, _layer_args(2, product))


def test_quantized_products() -> None:
    g = _gen()
    w, x, bias = torch.randn(20, 70, generator=g), torch.randn(3, 70, generator=g), torch.randn(20, generator=g)
    torch.library.opcheck(torch.ops.yaretnet.qlinear_int8.default, (x, *quantize_int8(w), bias, None))
    torch.library.opcheck(torch.ops.yaretnet.qlinear_int4.default, (x, *quantize_int4(w, 32), None, None))
