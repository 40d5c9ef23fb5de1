"""What the kernels read of this CPU (``ops/cpu/machine.py``): its kind, and the decoding
products' software prefetch distance chosen from it or from ``YARETNET_DECODE_PREFETCH``, which
must never change a result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from yet_another_retnet.ops.cpu import _extension
from yet_another_retnet.ops.cpu.machine import PREFETCH_ENV, cpu_kind, decode_prefetch, first_cpu
from yet_another_retnet.ops.cpu.quantized import qlinear, qlinear_int4, quantize_int4, quantize_int8


def info(vendor: str, family: int, model: int, flags: str) -> str:
    block = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
    return block + "\n" + block.replace("processor\t: 0", "processor\t: 1")


ZEN4 = info("AuthenticAMD", 25, 17, "fpu sse avx2 avx512f avx512_vnni avx512_bf16")
ZEN5 = info("AuthenticAMD", 26, 2, "avx512f avx512_vnni avx512_bf16")
ZEN3 = info("AuthenticAMD", 25, 1, "avx2")
XEON = info("GenuineIntel", 6, 143, "avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16")


def test_first_cpu_reads_the_first_processor_only() -> None:
    fields = first_cpu(ZEN4.replace("processor\t: 1\nvendor_id\t: AuthenticAMD", "processor\t: 1\nvendor_id\t: X"))
    assert fields is not None and fields["vendor_id"] == "AuthenticAMD" and fields["model"] == "17"


def test_cpu_kind_names_the_machine_kinds_the_results_come_from() -> None:
    assert cpu_kind(ZEN4) == "family 25 model 17, Zen 4, AVX512-VNNI, AVX512-BF16"
    assert cpu_kind(ZEN5) == "family 26 model 2, Zen 5, AVX512-VNNI, AVX512-BF16"
    assert cpu_kind(ZEN3) == "family 25 model 1, Zen 3"
    assert cpu_kind(XEON) == "family 6 model 143, AVX512-VNNI, AVX512-BF16, AMX"


def test_prefetch_is_off_on_zen4_only_by_default() -> None:
    assert decode_prefetch(ZEN4, env="")[:2] == (0, 0)
    assert decode_prefetch(ZEN4, env="auto")[:2] == (0, 0)
    for other in (ZEN5, ZEN3, XEON, ""):
        assert decode_prefetch(other, env="auto")[:2] == (1024, 2048)


@pytest.mark.parametrize(("value", "expected"), [
    ("0", (0, 0)), ("off", (0, 0)), (" OFF ", (0, 0)), ("512", (512, 512)), ("1024,2048", (1024, 2048)),
    ("0, 4096", (0, 4096)), ("8192", (8192, 8192)),
])
def test_the_variable_overrides_the_cpu_kind(value: str, expected: tuple[int, int]) -> None:
    floats, ints, why = decode_prefetch(ZEN4 if expected != (0, 0) else ZEN5, env=value)
    assert (floats, ints) == expected and PREFETCH_ENV in why


@pytest.mark.parametrize("value", ["fast", "-64", "100", "8256", "64,128,192", "1k", "64,"])
def test_a_malformed_variable_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match=PREFETCH_ENV):
        decode_prefetch(ZEN5, env=value)


needs_kernels = pytest.mark.skipif(not _extension.load(), reason="the C++ extension is not built here")


@needs_kernels
def test_the_op_rejects_a_distance_it_cannot_use() -> None:
    before = torch.ops.yaretnet.decode_prefetch()
    for bad in ((100, 0), (0, -64), (16384, 0)):
        with pytest.raises(RuntimeError, match="multiple of 64"):
            torch.ops.yaretnet.set_decode_prefetch(*bad)
    assert torch.ops.yaretnet.decode_prefetch() == before


@needs_kernels
def test_the_kernels_were_given_this_cpus_choice() -> None:
    assert tuple(torch.ops.yaretnet.decode_prefetch()) == decode_prefetch()[:2]


@needs_kernels
def test_prefetch_distance_never_changes_a_product() -> None:
    """Every decoding product (float32, bfloat16, int8, int4; 1 to 8 rows) gives the same bits with
    the prefetch off, at the defaults, and far ahead: it only moves when lines arrive."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 520, generator=g)
    q8, s8 = quantize_int8(w)
    q4 = quantize_int4(w, 64)

    def products() -> list[torch.Tensor]:
        out = [torch.ops.yaretnet.gemv(w, xs[0], None), torch.ops.yaretnet.gemv(w.bfloat16(), xs[0], None)]
        for rows in (1, 3, 8):
            out += [qlinear(xs[:rows], q8, s8), qlinear_int4(xs[:rows], *q4)]
        return out

    xs = torch.randn(8, 520, generator=g)
    before = torch.ops.yaretnet.decode_prefetch()
    try:
        results = []
        for distances in ((0, 0), (1024, 2048), (8192, 8192)):
            torch.ops.yaretnet.set_decode_prefetch(*distances)
            results.append(products())
    finally:
        torch.ops.yaretnet.set_decode_prefetch(*before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_kernels
def test_a_malformed_variable_stops_the_kernels_loading_with_its_name() -> None:
    """Not a silent fallback to plain PyTorch: the process fails, naming the variable."""
    env = {**os.environ, PREFETCH_ENV: "lots"}
    code = "import torch; from yet_another_retnet.ops.gemv import gemv; gemv(torch.ones(64, 64), torch.ones(64))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and PREFETCH_ENV in run.stderr and "'lots'" in run.stderr
