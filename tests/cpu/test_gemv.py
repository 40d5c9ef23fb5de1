"""The decoding kernel (``ops/cpu/csrc/gemv.cpp``) against a float64 reference and ``torch.mv``."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import kernels_expected

from yet_another_retnet.ops.gemv import bf16_dot, gemv, gemv_kernel_available

HAS_TOOLCHAIN = kernels_expected()
SHAPES = [(1, 1), (7, 5), (8, 16), (9, 17), (37, 45), (64, 64), (300, 257), (3072, 768)]


def test_the_kernel_builds_where_a_compiler_is_present() -> None:
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler (or kernels disabled): gemv is torch.mv here")
    assert gemv_kernel_available()


def reference(w: torch.Tensor, x: torch.Tensor, add: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``w @ x + add`` and, per element, the scale ``|w| @ |x| + |add|`` of its rounding error."""
    exact = torch.mv(w.double(), x.double())
    scale = torch.mv(w.double().abs(), x.double().abs())
    if add is not None:
        exact, scale = exact + add.double(), scale + add.double().abs()
    return exact, scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_add", [False, True])
def test_kernel_matches_float64(shape: tuple[int, int], wdtype: torch.dtype, xdtype: torch.dtype,
                                with_add: bool) -> None:
    if not gemv_kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, wdtype, xdtype, with_add)).encode()))
    w = torch.randn(shape, generator=gen).to(wdtype)
    x = torch.randn(shape[1], generator=gen).to(xdtype)
    add = torch.randn(shape[0], generator=gen).to(wdtype) if with_add else None
    with torch.inference_mode():
        got = torch.ops.yaretnet.gemv(w, x, add)
    assert got.shape == (shape[0],) and got.dtype == wdtype
    exact, scale = reference(w, x, add)
    # float32 sums: error ~ cols * 2^-24 of the magnitudes; bfloat16 output: one rounding, 2^-9.
    tol = shape[1] * 2**-23 * scale + (exact.abs() * 2**-8 if wdtype == torch.bfloat16 else 0)
    if wdtype == torch.bfloat16 and xdtype == torch.float32 and bf16_dot():
        tol = tol + scale * 2**-8  # the vector rounded to bfloat16: each value off by up to 2^-9
    assert bool(((got.double() - exact).abs() <= tol + 1e-30).all())
    # ... and it is what the fallback (torch.mv / torch.addmv, which rounds more often) computes.
    ct = torch.promote_types(wdtype, xdtype)
    want = torch.mv(w.to(ct), x.to(ct)) if add is None else torch.addmv(add.to(ct), w.to(ct), x.to(ct))
    # Its bfloat16 roundings of intermediates (the product, then the sum with add) are bounded by
    # the terms' magnitudes, not by the (possibly cancelled) result.
    rounding = scale * 2**-7 if ct == torch.bfloat16 else 0
    assert bool(((got.double() - want.double()).abs() <= 3 * tol + rounding + 1e-30).all())


def test_kernel_takes_non_contiguous_weights_and_rejects_bad_shapes() -> None:
    if not gemv_kernel_available():
        pytest.skip("kernel unavailable")
    w = torch.randn(40, 24).t()  # (24, 40), column-major
    x = torch.randn(40)
    exact, scale = reference(w, x, None)
    assert bool(((torch.ops.yaretnet.gemv(w, x, None).double() - exact).abs() <= 40 * 2**-23 * scale).all())
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.yaretnet.gemv(torch.randn(3, 4), torch.randn(5), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.yaretnet.gemv(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="add must"):
        torch.ops.yaretnet.gemv(torch.randn(3, 4), torch.randn(4), torch.randn(2))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_over_threads_are_each_computed_once(threads: int) -> None:
    """A prime number of rows, split over 1 to 3 threads and within each into four streams and a
    remainder, comes out whole in the float and int8 kernels."""
    if not gemv_kernel_available():
        pytest.skip("kernel unavailable")
    from yet_another_retnet.ops.cpu.quantized import qlinear, quantize_int8

    gen = torch.Generator().manual_seed(threads)
    w, x = torch.randn(5003, 96, generator=gen), torch.randn(96, generator=gen)
    q, qscale = quantize_int8(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            dense = torch.ops.yaretnet.gemv(w, x, None)
            int8 = qlinear(x[None], q, qscale)[0]
    finally:
        torch.set_num_threads(before)
    exact, scale = reference(w, x, None)
    assert bool(((dense.double() - exact).abs() <= 96 * 2**-23 * scale).all())
    exact8, scale8 = reference(q.double() * qscale.double()[:, None], x, None)
    # int8: the activations' rounding (at most max |x| / 65534 a value, with VNNI) on top.
    bound = 96 * 2**-23 * scale8 + (q.double().abs() * qscale.double()[:, None]).sum(1) * x.abs().max() / 65534
    assert bool(((int8.double() - exact8).abs() <= bound).all())


def test_gemv_falls_back_to_torch_mv_for_autograd_and_other_dtypes() -> None:
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(5)
    gemv(w, x, torch.ones(6)).sum().backward()  # the kernel has no backward: torch.addmv runs
    assert w.grad is not None and torch.allclose(w.grad, x.expand(6, 5))
    w64, x64 = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.equal(gemv(w64, x64), torch.mv(w64, x64))


def test_kernels_can_be_switched_off() -> None:
    code = ("import torch; from yet_another_retnet.ops.gemv import gemv, gemv_kernel_available; "
            "w, x = torch.randn(9, 7), torch.randn(7); "
            "assert not gemv_kernel_available(); assert torch.equal(gemv(w, x), torch.mv(w, x)); print('ok')")
    env = {**os.environ, "YARETNET_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
