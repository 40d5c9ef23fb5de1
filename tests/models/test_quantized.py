"""Weight-only int8: the kernel (``ops/cpu/csrc/quantized.cpp``) against float64, the quantized model's
decoding against its own float (dequantized) form, files, and quality on a trained model."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import pytest
import torch
from conftest import kernels_expected
from quantized_bounds import STEP_TOLERANCE, activation_rounding

from yet_another_retnet.layers.quantized import Int4Linear, QuantizedLinear
from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.models.quantized import is_quantized, quantize_model, save_quantized
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.cpu.quantized import (
    dequantize_int8,
    qlinear,
    quantize_int8,
)

HAS_TOOLCHAIN = kernels_expected()


def test_quantize_int8_rounds_each_row_to_its_scale() -> None:
    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and int(q.abs().max()) == 127
    assert scale[3] == 1.0 and not q[3].any()
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(3))


@pytest.mark.parametrize("rows, shape", [(1, (7, 5)), (3, (64, 48)), (8, (300, 257)), (9, (33, 100)),
                                         (20, (130, 64)), (32, (257, 300))])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64(rows: int, shape: tuple[int, int], xdtype: torch.dtype) -> None:
    kernel = _extension.load()
    if HAS_TOOLCHAIN:
        assert kernel
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rows, shape, xdtype)).encode()))
    q, scale = quantize_int8(torch.randn(shape, generator=gen))
    x = torch.randn(rows, shape[1], generator=gen).to(xdtype)
    bias, add = torch.randn(shape[0], generator=gen), torch.randn(rows, shape[0], generator=gen).to(xdtype)
    with torch.inference_mode():
        got = qlinear(x, q, scale, bias, add)
    assert got.shape == (rows, shape[0]) and got.dtype == xdtype
    w = dequantize_int8(q, scale, torch.float64)
    exact = x.double() @ w.T + bias.double() + add.double()
    magnitude = x.double().abs() @ w.abs().T + bias.double().abs() + add.double().abs()
    tol = shape[1] * 2**-23 * magnitude + (exact.abs() * 2**-8 if xdtype == torch.bfloat16 else 0)
    tol = tol + activation_rounding(x, w.abs().sum(1))
    if xdtype == torch.bfloat16 and not kernel:  # the fallback (no compiler, or switched off) rounds
        tol = tol + magnitude * 2**-8            # the weights to bfloat16 for a bfloat16 product
    assert bool(((got.double() - exact).abs() <= tol + 1e-30).all())



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 5, 99])
def test_a_nan_or_inf_activation_reaches_the_output_as_in_the_float_product(bad: float, where: int) -> None:
    # The integer products round the activations to fixed point; a vector holding NaN or inf
    # must take the float path instead (a rounded NaN would give finite, wrong sums).
    from yet_another_retnet.ops.cpu.quantized import qlinear_int4, quantize_int4

    gen = torch.Generator().manual_seed(where)
    w = torch.randn(40, 130, generator=gen)
    x = torch.randn(3, 130, generator=gen)
    x[1, where] = bad
    q, scale = quantize_int8(w)
    packed, scale4, low = quantize_int4(w, 64)
    with torch.inference_mode():
        for got, weight in ((qlinear(x, q, scale), dequantize_int8(q, scale)),
                            (qlinear_int4(x, packed, scale4, low), None)):
            assert bool(torch.isfinite(got[[0, 2]]).all())  # the other rows are untouched
            assert not bool(torch.isfinite(got[1]).any())  # every output of the bad row is NaN or inf
            if weight is not None:
                assert torch.equal(torch.isnan(got[1]), torch.isnan(x[1:2] @ weight.T)[0])


@pytest.fixture(scope="module")
def model() -> RetNet:
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, ffn="glu", activation="swish")
    return RetNet(config).eval()


#: Architectures whose int8 decoding step must follow their own layer layout: fla's (RoPE, the
#: weighted RMS head norm, SwiGLU), yet-another-retnet 0.5.1's (x + norm(f(x)), no final norm,
#: a head bias) and torchscale's post-norm.
ARCHITECTURES = {
    "fla": dict(rotation="rope", head_norm="rmsnorm", head_norm_weight=True, block_norm="rmsnorm",
                ffn="glu", activation="swish", tie_embeddings=False),
    "yar051": dict(pre_norm=False, post_norm_style="branch", final_norm=False, lm_head_bias=True,
                   tie_embeddings=False, bias=True, value_factor=1.0, decay="log-spaced"),
    "post-norm": dict(pre_norm=False, residual_scale=1.5),
}


@pytest.mark.parametrize("arch", ["default", *ARCHITECTURES])
def test_decoding_matches_the_dequantized_forward(model: RetNet, arch: str) -> None:
    if arch != "default":
        torch.manual_seed(0)
        model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, **ARCHITECTURES[arch])).eval()
        with torch.no_grad():  # non-trivial norm weights and biases, so a skipped one shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias") or "head_weight" in name:
                    p.add_(0.1 * torch.randn_like(p))
    qm = quantize_model(copy.deepcopy(model))
    assert is_quantized(qm) and not is_quantized(model)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = qm(ids, mode="parallel").logits  # every product through the dequantized weights
        state = qm.prefill(ids[:, :30]).state
        for t in range(30, 40):
            out = qm(ids[:, t:t + 1], state=state)  # the int8 step
            assert (out.logits[:, 0] - full[:, t]).abs().max() < STEP_TOLERANCE
            state = out.state
        # ... and int8 stays close to the float model it came from
        assert (model(ids).logits - full).abs().max() < 0.05 * model(ids).logits.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4", "int4-g32"])
@pytest.mark.parametrize("arch", ["default", "fla", "post-norm"])
def test_the_one_call_layer_kernel_matches_the_quantized_layer_in_pytorch_ops(method: str, arch: str) -> None:
    """A pre-norm quantized layer steps in one kernel call (its int8/int4 products inside
    ``decoder_layer_step``); its reference, the same layer in PyTorch ops around the quantized
    products, gives the same output and memory. A post-norm layer keeps the reference."""
    from yet_another_retnet.models.decoding import decoding_plan
    from yet_another_retnet.models.quantized import _layer_tokens, build_quantized_plan
    from yet_another_retnet.ops.cpu.decode_step import decoder_layer_step

    torch.manual_seed(0)
    options = {} if arch == "default" else ARCHITECTURES[arch]
    model = RetNet(RetNetConfig.from_preset("tiny", num_layers=1, chunk_size=16, **options)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a skipped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    layer = quantize_model(model, method).decoder.layers[0]
    decoder_plan = decoding_plan(model.decoder, torch.float32, build_quantized_plan)
    assert decoding_plan(model.decoder, torch.float32, build_quantized_plan) is decoder_plan  # kept
    assert decoder_plan.kernels is not None
    plan = decoder_plan.kernels[0]
    if arch == "post-norm" or not _extension.load():
        assert plan is None
        return
    assert plan is not None
    gen = torch.Generator().manual_seed(3)
    retention = layer.retention
    x = torch.randn(3, model.config.d_model, generator=gen)
    memory = 0.1 * torch.randn(3, retention.num_heads, retention.key_dim, retention.head_dim, generator=gen)
    rotation = retention.step_rotation(torch.tensor([0, 5, 300]), torch.float32)
    rotation = None if rotation is None else torch.view_as_real(rotation)
    with torch.inference_mode():
        out = decoder_layer_step(x, memory, rotation, plan)
        want, want_memory = _layer_tokens(layer, x, memory, [rotation])
    assert out is not None
    got, got_memory = out
    assert (got - want).abs().max() < STEP_TOLERANCE * want.abs().max()
    assert (got_memory - want_memory).abs().max() < STEP_TOLERANCE * want_memory.abs().max()
    # A layer changed in place gets a new plan (the cached one would read stale norms).
    with torch.no_grad():
        layer.retention_norm.weight.mul_(2.0)
    assert decoding_plan(model.decoder, torch.float32, build_quantized_plan) is not decoder_plan


def test_files_round_trip_and_from_pretrained_quantizes(model: RetNet, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "float")
    on_load = RetNet.from_pretrained(tmp_path / "float", quantize="int8")
    qm = quantize_model(copy.deepcopy(model))
    save_quantized(qm, tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "quantization.json").read_text())["method"] == "int8"
    loaded = RetNet.from_pretrained(tmp_path / "int8")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    want = qm.generate(ids, 8)
    assert torch.equal(loaded.generate(ids, 8), want) and torch.equal(on_load.generate(ids, 8), want)
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size < 0.45 * (tmp_path / "float" / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="quantize must be one of"):
        RetNet.from_pretrained(tmp_path / "float", quantize="int3")
    (tmp_path / "int8" / "quantization.json").write_text('{"method": "int2"}')
    with pytest.raises(ValueError, match="unknown quantization method"):
        RetNet.from_pretrained(tmp_path / "int8")


@pytest.mark.slow
def test_int8_quality_on_a_trained_model(tmp_path: Path) -> None:
    """A briefly trained model: int8 validation loss within 0.5% of float, top-1 agreement >= 99%."""
    from yet_another_retnet.training.data import default_corpus_text, encode_corpus, split_tokens
    from yet_another_retnet.training.trainer import TrainConfig, train

    train(TrainConfig(out=str(tmp_path / "run"), d_model=64, num_layers=2, num_heads=2, ffn_dim=128, seq_len=48,
                      batch_size=8, max_steps=40, eval_interval=40, eval_max_windows=2, sample_tokens=0,
                      device="cpu", lr=3e-3, warmup_steps=5))
    model = RetNet.from_pretrained(tmp_path / "run")
    qm = RetNet.from_pretrained(tmp_path / "run", quantize="int8")
    _, val = split_tokens(encode_corpus(default_corpus_text()), 0.05)
    windows = val[: 8 * 65].view(8, 65)
    with torch.no_grad():
        a, b = model(windows[:, :-1], labels=windows[:, :-1]), qm(windows[:, :-1], labels=windows[:, :-1])
    assert float(a.loss) < 3.0  # it learned something (uniform: ln 256 = 5.55)
    assert abs(float(b.loss) - float(a.loss)) <= 0.005 * float(a.loss)
    agree = (a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean()
    assert float(agree) >= 0.99


def _rewrite(path: Path, change_tensors=None, **metadata: str | None) -> None:
    """Write ``path`` (a safetensors file) again, its metadata updated by ``metadata`` (``None``
    drops a key) and its tensors by ``change_tensors``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata() or {})
    meta.update(metadata)
    if change_tensors is not None:
        change_tensors(tensors)
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})


def test_quantized_metadata_is_parsed_as_data_never_opened_as_a_path(model: RetNet, tmp_path: Path) -> None:
    directory = tmp_path / "int8"
    save_quantized(quantize_model(copy.deepcopy(model)), directory)
    secret = tmp_path / "secret.json"
    secret.write_text((directory / "config.json").read_text())  # a valid config, reachable as a path
    for value in (str(secret), str(tmp_path / "nowhere.json"), " " + str(secret)):
        _rewrite(directory / "model.safetensors", config=value)
        with pytest.raises(ValueError, match=r"model\.safetensors: the config in its metadata is invalid"):
            RetNet.from_pretrained(directory)


def test_quantized_weights_carry_a_checksum(model: RetNet, tmp_path: Path) -> None:
    from yet_another_retnet.models.checkpoint import CHECKSUM_KEY

    qm = quantize_model(copy.deepcopy(model))
    save_quantized(qm, tmp_path / "int8")
    path = tmp_path / "int8" / "model.safetensors"
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    want = qm.generate(ids, 4)

    def flip(tensors: dict[str, torch.Tensor]) -> None:  # one int8 code changed, the checksum kept
        name = next(n for n in sorted(tensors) if tensors[n].dtype == torch.int8)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] ^= 1

    _rewrite(path, flip)
    with pytest.raises(OSError, match=r"int8/model\.safetensors is corrupt"):
        RetNet.from_pretrained(tmp_path / "int8")
    assert RetNet.from_pretrained(tmp_path / "int8", verify=False) is not None
    _rewrite(path, **{CHECKSUM_KEY: None})  # a file from before the checksum: loads unverified
    RetNet.from_pretrained(tmp_path / "int8")
    save_quantized(qm, tmp_path / "int8")
    assert torch.equal(RetNet.from_pretrained(tmp_path / "int8").generate(ids, 4), want)


def test_a_quantized_model_saves_in_its_own_format_and_is_not_exported_to_fla(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from yet_another_retnet.cli import main

    torch.manual_seed(0)
    float_model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, dropout=0.0,
                                                  **ARCHITECTURES["fla"])).eval()  # fla could take its float form
    qm = quantize_model(copy.deepcopy(float_model))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    want = qm.generate(ids, 5)
    qm.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["method"] == "int8"
    assert torch.equal(RetNet.from_pretrained(tmp_path / "q").generate(ids, 5), want)
    with pytest.raises(ValueError, match=r"quantized \(int8\).*float weights"):
        qm.to_fla(tmp_path / "fla")
    assert not (tmp_path / "fla").exists()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "to-fla")]) == 2  # ours -> fla by default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized" in err[0], err
    assert not (tmp_path / "to-fla").exists()
    assert main(["convert", "--to", "ours", str(tmp_path / "q"), str(tmp_path / "copy")]) == 0
    assert torch.equal(RetNet.from_pretrained(tmp_path / "copy").generate(ids, 5), want)


def _small_rows_linear() -> torch.nn.Linear:
    """A linear whose rows' largest weights run from ~2 down to ~2e-4: float16 scales of the
    smaller ones are subnormal (fewer bits) or flush to zero."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(1, -3, 48)[:, None] * 2)
    return linear


@pytest.mark.parametrize("make", [QuantizedLinear.from_linear, lambda lin: Int4Linear.from_linear(lin, 64)],
                         ids=["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scales_stay_float32_when_the_model_is_cast(make, dtype: torch.dtype) -> None:
    layer = make(_small_rows_linear())
    names = ["weight_scale"] + (["weight_low"] if isinstance(layer, Int4Linear) else [])
    scales = {name: layer._buffers[name].clone() for name in names}
    exact = layer.weight.double()  # q * scale in float32, exactly representable in float64
    cast = layer.half() if dtype == torch.float16 else layer.to(dtype)
    for name, before in scales.items():
        assert cast._buffers[name].dtype == torch.float32 and torch.equal(cast._buffers[name], before), name
    assert cast.float_like.dtype == dtype and cast.weight.dtype == dtype and cast.bias.dtype == dtype
    # Each weight is rounded once, to the cast dtype: every row's product within that rounding of
    # the exact one (with float16 scales, rows of small weights were off by up to ~28%).
    x = torch.randn(5, 256, dtype=torch.float64)
    got, want = x @ cast.weight.double().T, x @ exact.T
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    bound = (x.abs() @ exact.abs().T) * unit + (x.abs() @ (exact.abs() < 6.2e-5).double().T) * 2.0**-24
    assert ((got - want).abs() <= bound).all()
    assert layer.float().float_like.dtype == torch.float32


def test_a_bfloat16_quantized_model_saves_float32_scales_and_reads_older_bfloat16_ones(model: RetNet,
                                                                                    tmp_path: Path) -> None:
    from safetensors import safe_open

    qm = quantize_model(copy.deepcopy(model).to(torch.bfloat16))
    save_quantized(qm, tmp_path / "int8")
    path = tmp_path / "int8" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        kinds = {f.get_tensor(n).dtype for n in f.keys() if n.endswith("weight_scale")}  # noqa: SIM118
    assert kinds == {torch.float32}
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    want = qm.generate(ids, 5)
    loaded = RetNet.from_pretrained(tmp_path / "int8")
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.generate(ids, 5), want)

    def as_bfloat16(tensors: dict[str, torch.Tensor]) -> None:  # what earlier versions saved
        for n in [n for n in tensors if n.endswith("weight_scale")]:
            tensors[n] = tensors[n].to(torch.bfloat16)

    from yet_another_retnet.models.checkpoint import CHECKSUM_KEY

    _rewrite(path, as_bfloat16, **{CHECKSUM_KEY: None})
    old = RetNet.from_pretrained(tmp_path / "int8")
    head = old.lm_head
    assert isinstance(head, QuantizedLinear) and head.weight_scale.dtype == torch.float32
    assert old.dtype == torch.bfloat16 and head.float_like.dtype == torch.bfloat16
    assert old.generate(ids, 5).shape == want.shape
    assert RetNet.from_pretrained(tmp_path / "int8", dtype=torch.float32).lm_head.weight.dtype == torch.float32
