"""Weight-only int4 with groups: the packing, the kernel (``ops/cpu/csrc/quantized.cpp``) against the
float64 product of the dequantized weight, the model's int4 decoding against its own dequantized
forward and against int8 and float, files (and their refusals) and the command line."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import pytest
import torch
from conftest import kernels_expected
from quantized_bounds import STEP_TOLERANCE, activation_rounding
from safetensors import safe_open
from safetensors.torch import save_file

from yet_another_retnet.cli import QUANTIZE_CHOICES, main
from yet_another_retnet.layers.quantized import Int4Linear, QuantizedLinear
from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.models.quantized import (
    QUANTIZE_METHODS,
    is_quantized,
    quantize_model,
    save_quantized,
)
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.cpu.quantized import (
    dequantize_int4,
    interleave_int4,
    qlinear_int4,
    qlinear_int4_reference,
    quantize_int4,
)

HAS_TOOLCHAIN = kernels_expected()


def test_quantize_int4_codes_each_group_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(9, 100, generator=gen)  # 100 columns: groups of 32 -> 4 groups, the last of 4 columns
    w[2, :32] = 0.5  # a constant group
    packed, scale, low = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (9, 64) and scale.shape == low.shape == (9, 4)
    assert scale[2, 0] == 1.0 and low[2, 0] == 0.5
    back = dequantize_int4(packed, scale, low, 100)
    step = scale.repeat_interleave(32, dim=1)[:, :100]
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    # Each group's extremes are exact (codes 0 and 15 land on min and max).
    for g in range(4):
        cols = w[:, 32 * g:32 * (g + 1)]
        assert torch.allclose(back[:, 32 * g:32 * (g + 1)].amin(1), cols.amin(1))
    # The nibble layout: byte k of a 32-column block holds column k (low) and column k + 16 (high).
    codes = torch.round((w[0, :32] - low[0, 0]) / scale[0, 0]).to(torch.uint8)
    assert torch.equal(packed[0, :16], codes[:16] | (codes[16:] << 4))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, 48)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int4(torch.tensor([[1.0, float("inf")]]), 32)


@pytest.mark.parametrize("rows, shape, group", [(1, (7, 5), 32), (3, (64, 48), 64), (8, (300, 257), 128),
                                                (9, (33, 100), 32), (20, (130, 768), 128), (32, (257, 300), 256)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_float64(rows: int, shape: tuple[int, int], group: int, xdtype: torch.dtype) -> None:
    kernel = _extension.load()
    if HAS_TOOLCHAIN:
        assert kernel
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rows, shape, group, xdtype)).encode()))
    packed, scale, low = quantize_int4(torch.randn(shape, generator=gen), group)
    x = torch.randn(rows, shape[1], generator=gen).to(xdtype)
    bias, add = torch.randn(shape[0], generator=gen), torch.randn(rows, shape[0], generator=gen).to(xdtype)
    with torch.inference_mode():
        got = qlinear_int4(x, packed, scale, low, bias, add)
    assert got.shape == (rows, shape[0]) and got.dtype == xdtype
    w = dequantize_int4(packed, scale, low, shape[1], torch.float64)
    exact = x.double() @ w.T + bias.double() + add.double()
    # The kernel sums code * x and x per group, then scales: bound by the magnitudes of both parts.
    parts = (dequantize_int4(packed, scale, torch.zeros_like(low), shape[1], torch.float64).abs()
             + low.double().abs().repeat_interleave(group, dim=1)[:, :shape[1]])
    magnitude = x.double().abs() @ parts.T + bias.double().abs() + add.double().abs()
    tol = 2 * shape[1] * 2**-23 * magnitude + (exact.abs() * 2**-8 if xdtype == torch.bfloat16 else 0)
    codes = dequantize_int4(packed, scale, torch.zeros_like(low), shape[1], torch.float64).abs().sum(1)
    tol = tol + activation_rounding(x, codes)  # the scaled codes' part: the lows multiply float sums of x
    if xdtype == torch.bfloat16 and not kernel:  # the fallback (no compiler, or switched off) rounds
        tol = tol + magnitude * 2**-8            # the weights to bfloat16 for a bfloat16 product
    assert bool(((got.double() - exact).abs() <= tol + 1e-30).all())
    # The float path (a prompt's rows, or no extension) computes the same product.
    ref = qlinear_int4_reference(x.float(), packed, scale, low, bias, add.float())
    assert bool(((ref.double() - exact).abs() <= tol + 1e-5 * magnitude).all())


def test_int4_kernel_refuses_a_mismatched_weight() -> None:
    packed, scale, low = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="int4 weight for 100 input columns"):
        qlinear_int4(torch.randn(1, 100), packed, scale, low)
    with pytest.raises(ValueError, match="do not form"):
        qlinear_int4(torch.randn(1, 64), packed, scale[:, :1], low)



@pytest.mark.parametrize("rows, shape, group", [(1, (7, 5), 32), (3, (64, 48), 64), (8, (300, 257), 128),
                                                (12, (130, 768), 32), (32, (257, 300), 256)])
def test_interleaved_int4_rows_read_as_the_separate_tensors(rows: int, shape: tuple[int, int], group: int) -> None:
    """A decoding plan's int4 weight (interleave_int4: each row's scales, lows and codes in one
    buffer) equals its parts and gives bit for bit the product of the separate tensors, on the
    kernel (integer or float loop, as built) and on the reference."""
    if HAS_TOOLCHAIN:
        assert _extension.load()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rows, shape, group)).encode()))
    packed, scale, low = quantize_int4(torch.randn(shape, generator=gen), group)
    views = interleave_int4(packed, scale, low)
    assert all(torch.equal(a, b) for a, b in zip(views, (packed, scale, low), strict=True))
    codes, vscale, vlow = views
    # One buffer: a row's scales, then its lows, then its codes on the next 64-byte line.
    base = codes.untyped_storage().data_ptr()
    assert vscale.untyped_storage().data_ptr() == vlow.untyped_storage().data_ptr() == base
    assert codes.stride(0) == 4 * vscale.stride(0) == 4 * vlow.stride(0) and codes.stride(0) % 64 == 0
    assert codes.data_ptr() % 64 == 0 and vlow.data_ptr() - vscale.data_ptr() == 4 * scale.shape[1]
    x = torch.randn(rows, shape[1], generator=gen)
    bias = torch.randn(shape[0], generator=gen)
    with torch.inference_mode():
        assert torch.equal(qlinear_int4(x, *views, bias), qlinear_int4(x, packed, scale, low, bias))
        # Rows of no unit stride are copied into the kernel's form, not misread.
        wide = torch.zeros(shape[0], 2 * packed.shape[1], dtype=torch.uint8)
        wide[:, ::2] = packed
        assert torch.equal(qlinear_int4(x, wide[:, ::2], scale, low, bias), qlinear_int4(x, packed, scale, low, bias))
    assert torch.equal(qlinear_int4_reference(x, *views, bias), qlinear_int4_reference(x, packed, scale, low, bias))
    with pytest.raises(ValueError, match="scale and low"):
        interleave_int4(packed, scale, low[:-1])
    with pytest.raises(ValueError, match="packed must be"):
        interleave_int4(packed.to(torch.int8), scale, low)


@pytest.fixture(scope="module")
def model() -> RetNet:
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, ffn="glu", activation="swish")
    return RetNet(config).eval()


@pytest.mark.parametrize("method", ["int4", "int4-g32"])
def test_int4_decoding_matches_the_dequantized_forward(model: RetNet, method: str) -> None:
    qm = quantize_model(copy.deepcopy(model), method)
    fc2 = qm.decoder.layers[0].ffn.fc2
    assert is_quantized(qm) and isinstance(fc2, Int4Linear) and isinstance(qm.lm_head, QuantizedLinear)
    assert fc2.group_size == (32 if method == "int4-g32" else 128)  # the head stays int8
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    int8 = quantize_model(copy.deepcopy(model), "int8")
    with torch.no_grad():
        full = qm(ids, mode="parallel").logits  # every product through the dequantized weights
        state = qm.prefill(ids[:, :30]).state
        for t in range(30, 40):
            out = qm(ids[:, t:t + 1], state=state)  # the int4 step
            assert (out.logits[:, 0] - full[:, t]).abs().max() < STEP_TOLERANCE
            state = out.state
        # int4 stays near the float model (random weights: ~37% relative error at 16 levels a
        # group), and int8 (255 levels a row) ~17x nearer; a misplaced nibble would be ~140%.
        want = model(ids).logits
        err4, err8 = ((want - full).norm() / want.norm()), ((want - int8(ids).logits).norm() / want.norm())
        assert err4 < 0.5 and 8 * err8 < err4


def test_int4_files_round_trip_and_refuse_a_mismatch(model: RetNet, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "float")
    on_load = RetNet.from_pretrained(tmp_path / "float", quantize="int4-g64")
    qm = quantize_model(copy.deepcopy(model), "int4-g64")
    save_quantized(qm, tmp_path / "int4")
    info = json.loads((tmp_path / "int4" / "quantization.json").read_text())
    assert info["method"] == "int4-g64" and info["bits"] == 4 and info["group_size"] == 64
    with safe_open(str(tmp_path / "int4" / "model.safetensors"), framework="pt") as f:
        assert (f.metadata() or {})["quantization"] == "int4-g64"
    loaded = RetNet.from_pretrained(tmp_path / "int4")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    want = qm.generate(ids, 8)
    assert torch.equal(loaded.generate(ids, 8), want) and torch.equal(on_load.generate(ids, 8), want)
    size = (tmp_path / "int4" / "model.safetensors").stat().st_size
    float_size = (tmp_path / "float" / "model.safetensors").stat().st_size
    assert size < 0.45 * float_size  # the float embedding stays; the projections shrink ~6x
    with pytest.raises(ValueError, match="holds int4-g64 weights already"):
        RetNet.from_pretrained(tmp_path / "int4", quantize="int8")
    assert info["lm_head"] == "int8" and isinstance(loaded.lm_head, QuantizedLinear)
    # A file from before the int4 methods kept the head in int8 (its head in int4) reads as written.
    old = copy.deepcopy(qm)
    old.lm_head = Int4Linear.from_linear(model.lm_head, 64)
    save_quantized(old, tmp_path / "old")
    read_old = RetNet.from_pretrained(tmp_path / "old")
    assert isinstance(read_old.lm_head, Int4Linear) and read_old.lm_head.group_size == 64
    assert torch.equal(read_old.generate(ids, 8), old.generate(ids, 8))
    # quantization.json naming another group than the file's metadata: refused, not misread.
    (tmp_path / "int4" / "quantization.json").write_text('{"method": "int4"}')
    with pytest.raises(ValueError, match="does not hold int4 weights"):
        RetNet.from_pretrained(tmp_path / "int4")
    # A file whose tensors have another group's shapes, metadata and all: refused by its shapes.
    other = quantize_model(copy.deepcopy(model), "int4-g32")
    save_quantized(other, tmp_path / "g32")
    with safe_open(str(tmp_path / "g32" / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata() or {})
    save_file(tensors, str(tmp_path / "int4" / "model.safetensors"), metadata={**meta, "quantization": "int4"})
    with pytest.raises(ValueError, match="wrong shape or type"):
        RetNet.from_pretrained(tmp_path / "int4")


def test_cli_offers_every_method(model: RetNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert QUANTIZE_CHOICES == QUANTIZE_METHODS
    model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q4"), "--method", "int4"]) == 0
    assert "(int4)" in capsys.readouterr().out
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    want = RetNet.from_pretrained(tmp_path / "float", quantize="int4").generate(ids, 6)
    assert torch.equal(RetNet.from_pretrained(tmp_path / "q4").generate(ids, 6), want)
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q3"), "--method", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err and not (tmp_path / "q3").exists()


def test_bench_quantization_scores_the_held_out_split(model: RetNet, tmp_path: Path) -> None:
    from yet_another_retnet.training.data import default_corpus_text, encode_corpus, split_tokens

    model.save_pretrained(tmp_path / "float")
    out = tmp_path / "report"
    assert main(["bench", "quantization", "--model", str(tmp_path / "float"), "--windows", "3", "--seq-len", "32",
                 "--batch", "2", "--methods", "int8,int4", "--out", str(out)]) == 0
    result = json.loads((out / "quantization.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"float32", "int8", "int4"} and result["scored_tokens"] == 3 * 32
    # The float row is the model's own loss on the last 5% of the corpus, windows of 33 tokens.
    _, val = split_tokens(encode_corpus(default_corpus_text()), 0.05)
    windows = val[: 3 * 32 + 1].unfold(0, 33, 32)
    with torch.no_grad():
        want = model(windows, labels=windows).loss  # position t scores token t + 1; the last nothing
    assert abs(rows["float32"]["loss"] - float(want)) < 1e-4
    assert abs(rows["int8"]["loss_ratio"] - 1) < abs(rows["int4"]["loss_ratio"] - 1)
    assert rows["int8"]["top1_agreement"] > rows["int4"]["top1_agreement"]
    assert "| int4 |" in (out / "quantization.md").read_text()


def _no_dequantizing(self: object) -> torch.Tensor:
    raise AssertionError("a short prompt dequantized a weight")


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["default", "fla", "yar051"])
def test_a_short_prompt_prefills_on_the_kernels(method: str, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of at most 32 tokens in all prefills through the quantized products (no weight is
    dequantized) and gives the dequantized forward's last logits and state, with or without a
    state to start from."""
    from yet_another_retnet.layers.quantized import QuantizedLinear

    if HAS_TOOLCHAIN:
        assert _extension.load()
    options = {"default": {}, "fla": dict(rotation="rope", head_norm="rmsnorm", head_norm_weight=True,
                                          block_norm="rmsnorm", ffn="glu", activation="swish", tie_embeddings=False),
               "yar051": dict(pre_norm=False, post_norm_style="branch", final_norm=False, lm_head_bias=True,
                              tie_embeddings=False, bias=True, value_factor=1.0)}[arch]
    torch.manual_seed(0)
    qm = quantize_model(RetNet(RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, **options)).eval(), method)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = qm(ids, mode="parallel")  # dequantized weights, the parallel form
        with monkeypatch.context() as patch:
            if _extension.load():
                patch.setattr(QuantizedLinear, "weight", property(_no_dequantizing))
                patch.setattr(Int4Linear, "weight", property(_no_dequantizing))
            short = qm.prefill(ids[:, :10])  # 20 rows, from no state
            more = qm.prefill(ids[:, 10:24], state=short.state)  # 28 rows, from a state
    assert (short.logits[:, 0] - full.logits[:, 9]).abs().max() < STEP_TOLERANCE
    assert (more.logits[:, 0] - full.logits[:, 23]).abs().max() < STEP_TOLERANCE
    assert torch.equal(more.state.position, torch.tensor([24, 24]))
    with torch.no_grad():
        whole = qm(ids, mode="chunkwise").state
    for a, b in zip(more.state.memories, whole.memories, strict=True):
        assert (a - b).abs().max() < STEP_TOLERANCE


def test_a_decoding_plan_interleaves_its_int4_products(model: RetNet) -> None:
    from yet_another_retnet.models.quantized import _parts

    quantized = quantize_model(copy.deepcopy(model), "int4")
    retention = quantized.decoder.layers[0].retention
    (codes, scale, low), _ = _parts((retention.q_proj, retention.k_proj, retention.v_proj, retention.g_proj))
    assert codes.untyped_storage().data_ptr() == scale.untyped_storage().data_ptr()
    stacked = [torch.cat(p) for p in zip(*(m.qparams() for m in (retention.q_proj, retention.k_proj,
                                                                  retention.v_proj, retention.g_proj)), strict=True)]
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, low), stacked, strict=True))
