"""What the kernels read of this CPU (``ops/cpu/machine.py``): its kind, and how the decoding
kernels move memory (prefetch distances, streaming stores for the state), chosen from it or from
the environment, which must never change a result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from yet_another_retnet.ops.cpu import _extension
from yet_another_retnet.ops.cpu.decode_step import retention_step, retention_step_reference
from yet_another_retnet.ops.cpu.machine import (
    PREFETCH_ENV,
    STREAM_ENV,
    cpu_kind,
    decode_tuning,
    first_cpu,
)
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


def test_zen4_decodes_without_prefetch_or_streaming_stores_by_default() -> None:
    for env in ({}, {PREFETCH_ENV: "auto", STREAM_ENV: " AUTO"}, {PREFETCH_ENV: ""}):
        tuning = decode_tuning(ZEN4, env)
        assert (tuning.float_prefetch, tuning.int_prefetch, tuning.stream_state) == (0, 0, False)
    for other in (ZEN5, ZEN3, XEON, ""):
        tuning = decode_tuning(other, {})
        assert (tuning.float_prefetch, tuning.int_prefetch, tuning.stream_state) == (1024, 2048, True)


@pytest.mark.parametrize(("value", "expected"), [
    ("0", (0, 0)), ("off", (0, 0)), (" OFF ", (0, 0)), ("512", (512, 512)), ("1024,2048", (1024, 2048)),
    ("0, 4096", (0, 4096)), ("8192", (8192, 8192)),
])
def test_the_prefetch_variable_overrides_the_cpu_kind(value: str, expected: tuple[int, int]) -> None:
    tuning = decode_tuning(ZEN4 if expected != (0, 0) else ZEN5, {PREFETCH_ENV: value})
    assert (tuning.float_prefetch, tuning.int_prefetch) == expected and PREFETCH_ENV in tuning.why
    assert tuning.stream_state == (expected == (0, 0))  # the other part still follows the kind


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("on", True), ("0", False), ("False", False)])
def test_the_stream_variable_overrides_the_cpu_kind(value: str, expected: bool) -> None:
    for cpu in (ZEN4, ZEN5):
        tuning = decode_tuning(cpu, {STREAM_ENV: value})
        assert tuning.stream_state is expected and STREAM_ENV in tuning.why


@pytest.mark.parametrize("value", ["fast", "-64", "100", "8256", "64,128,192", "1k", "64,"])
def test_a_malformed_prefetch_variable_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match=PREFETCH_ENV):
        decode_tuning(ZEN5, {PREFETCH_ENV: value})


@pytest.mark.parametrize("value", ["2", "yes please", "streaming"])
def test_a_malformed_stream_variable_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match=STREAM_ENV):
        decode_tuning(ZEN5, {STREAM_ENV: value})


needs_kernels = pytest.mark.skipif(not _extension.load(), reason="the C++ extension is not built here")


@needs_kernels
def test_the_op_rejects_a_distance_it_cannot_use() -> None:
    before = torch.ops.yaretnet.decode_tuning()
    for bad in ((100, 0), (0, -64), (16384, 0)):
        with pytest.raises(RuntimeError, match="multiple of 64"):
            torch.ops.yaretnet.set_decode_tuning(*bad, True)
    assert torch.ops.yaretnet.decode_tuning() == before


@needs_kernels
def test_the_kernels_were_given_this_cpus_choice() -> None:
    tuning = decode_tuning()
    assert tuple(torch.ops.yaretnet.decode_tuning()) == (tuning.float_prefetch, tuning.int_prefetch,
                                                          tuning.stream_state)


@needs_kernels
def test_the_tuning_never_changes_a_result() -> None:
    """Every decoding product (float32, bfloat16, int8, int4; 1 to 8 rows) and the core with a state
    large enough for streaming stores, into a new memory and in place, give the same bits with the
    prefetch off, at the defaults and far ahead, with streaming stores and without: the choices
    only move when lines arrive and leave. The core also matches its reference."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 520, generator=g)
    xs = torch.randn(8, 520, generator=g)
    q8, s8 = quantize_int8(w)
    q4 = quantize_int4(w, 64)
    heads, dk, dv = 4, 256, 512  # 2 MB of state: past the streaming stores' threshold
    proj = torch.randn(1, 2 * heads * (dk + dv), generator=g)
    memory = torch.randn(1, heads, dk, dv, generator=g) * 0.1
    gamma = torch.full((heads, 1, 1), 0.97)
    rotation = torch.polar(torch.ones(1, 2, 1, dk // 2), torch.rand(1, 2, 1, dk // 2, generator=g) * 6.28)
    real = torch.view_as_real(rotation).reshape(1, 2, dk // 2, 2).contiguous()

    def results() -> list[torch.Tensor]:
        out = [torch.ops.yaretnet.gemv(w, xs[0], None), torch.ops.yaretnet.gemv(w.bfloat16(), xs[0], None)]
        for rows in (1, 3, 8):
            out += [qlinear(xs[:rows], q8, s8), qlinear_int4(xs[:rows], *q4)]
        out += list(retention_step(proj, memory, rotation, gamma, None, None, 1e-5, False, None))
        in_place = memory.clone()
        out += [torch.ops.yaretnet.retention_step_inplace(proj, in_place, real, gamma.reshape(-1), None, None, 1e-5,
                                                          False, 0), in_place]
        return out

    before = torch.ops.yaretnet.decode_tuning()
    try:
        runs = []
        for prefetch in ((0, 0), (1024, 2048), (8192, 8192)):
            for stream in (False, True):
                torch.ops.yaretnet.set_decode_tuning(*prefetch, stream)
                runs.append(results())
    finally:
        torch.ops.yaretnet.set_decode_tuning(*before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    y, new = retention_step_reference(proj, memory, rotation, gamma, None, None, 1e-5, False, None)
    torch.testing.assert_close(runs[0][-4], y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs[0][-3], new, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("name", [PREFETCH_ENV, STREAM_ENV])
def test_a_malformed_variable_stops_the_kernels_loading_with_its_name(name: str) -> None:
    """Not a silent fallback to plain PyTorch: the process fails, naming the variable."""
    env = {**os.environ, name: "lots"}
    code = "import torch; from yet_another_retnet.ops.gemv import gemv; gemv(torch.ones(64, 64), torch.ones(64))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and name in run.stderr and "'lots'" in run.stderr
