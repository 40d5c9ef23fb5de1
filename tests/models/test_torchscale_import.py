"""``RetNet.from_torchscale`` against the real torchscale 0.3.0 ``RetNetDecoder``.

The reference is torchscale's own parallel forward on the full sequence (its multi-token prompt
path crashes). To compare in true float64, three float32 roundings inside torchscale are undone
on the reference side: its decay buffer is computed with ``dtype=torch.float`` (so ``log gamma``
is float32-rounded), and its ``RMSNorm`` and ``GLU`` cast to ``.float()`` whatever the input
dtype. Those patches change only precision, never the formula; the unpatched float32 model is
compared too, at float32 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.bench.common import shim_timm
from yet_another_retnet.models.torchscale import config_from_torchscale, key_map

pytest.importorskip("fairscale")


shim_timm()
ts_retnet = pytest.importorskip("torchscale.architecture.retnet")
ts_config = pytest.importorskip("torchscale.architecture.config")
ts_rms = pytest.importorskip("torchscale.component.rms_norm")
ts_glu = pytest.importorskip("torchscale.component.gate_linear_unit")

VOCAB = 61


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture
def float64_torchscale(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchscale's RMSNorm and GLU without their ``.float()`` casts (same formulas)."""

    def rms_forward(self, x):  # type: ignore[no-untyped-def]
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * self.weight if self.weight is not None else out

    def glu_forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc2(self.activation_fn(self.fc1(x)) * self.gate(x))

    monkeypatch.setattr(ts_rms.RMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ts_glu.GLU, "forward", glu_forward)


def build_torchscale(seed: int = 0, float64: bool = True, **options: object):  # type: ignore[no-untyped-def]
    """A small random torchscale RetNetDecoder (valid dims: its defaults crash) and its config."""
    fields = {
        "decoder_embed_dim": 32, "decoder_value_embed_dim": 64, "decoder_retention_heads": 4,
        "decoder_ffn_embed_dim": 48, "decoder_layers": 2, "vocab_size": VOCAB,
    }
    fields.update(options)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if float64:
        # torchscale computes its rotation angles in the default dtype at construction.
        torch.set_default_dtype(torch.float64)
    try:
        config = ts_config.RetNetConfig(**fields)
        decoder = ts_retnet.RetNetDecoder(config, embed_tokens=torch.nn.Embedding(VOCAB, 32))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # Norm weights start at 1; move them so a swapped or dropped norm cannot go unnoticed.
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
        if float64:
            decoder.double()
            heads = torch.arange(config.decoder_retention_heads, dtype=torch.float64)
            decoder.retnet_rel_pos.decay.copy_(torch.log(1 - 2 ** (-5 - heads)))
    return decoder.eval(), config


VARIANTS = {
    "untied": {},
    "tied+scaled+embnorm": {
        "share_decoder_input_output_embed": True, "no_scale_embedding": False, "layernorm_embedding": True,
    },
    "value_dim=embed_dim,swish": {"decoder_value_embed_dim": 32, "activation_fn": "swish"},
    "deepnorm(post-norm)": {"deepnorm": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_all_forms_match_torchscale_parallel_float64_eps0(variant: str, float64_torchscale: None) -> None:
    decoder, config = build_torchscale(seed=1, layernorm_eps=0.0, **VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = decoder(ids)
        model = RetNet.from_torchscale(decoder.state_dict(), config)
        assert model.dtype == torch.float64
        for mode in ("parallel", "chunkwise", "recurrent"):
            got = model(ids, mode=mode, chunk_size=5).logits
            assert rel(got, expected) < 1e-9, (variant, mode, rel(got, expected))
        # A resumed state continues torchscale's sequence too.
        first = model(ids[:, :7], mode="chunkwise", chunk_size=3)
        rest = model(ids[:, 7:], state=first.state, mode="recurrent").logits
        assert rel(rest, expected[:, 7:]) < 1e-9


def test_mapping_and_config_fields() -> None:
    decoder, config = build_torchscale(
        float64=False, share_decoder_input_output_embed=True, no_scale_embedding=False, layernorm_eps=1e-5,
        activation_fn="relu", decoder_value_embed_dim=96, deepnorm=True,
    )
    ours = config_from_torchscale(config)
    assert ours.tie_embeddings and ours.embed_scale == pytest.approx(math.sqrt(32))
    assert ours.norm_eps == 1e-5 and ours.activation == "relu" and ours.value_head_dim == 24
    assert ours.residual_scale == pytest.approx((2 * 2) ** 0.25) and not ours.pre_norm
    model = RetNet.from_torchscale(decoder.state_dict(), config)
    ts_state = decoder.state_dict()
    for ts_name, our_name in key_map(ours).items():
        assert torch.equal(model.state_dict()[our_name], ts_state[ts_name]), ts_name
    assert model.lm_head.weight is model.embed_tokens.weight
    # A dict of fields reads like torchscale's constructor (its deepnorm/subln rules applied).
    as_dict = {"decoder_embed_dim": 32, "decoder_value_embed_dim": 96, "decoder_retention_heads": 4,
               "decoder_ffn_embed_dim": 48, "decoder_layers": 2, "vocab_size": VOCAB, "deepnorm": True,
               "share_decoder_input_output_embed": True, "no_scale_embedding": False,
               "layernorm_eps": 1e-5, "activation_fn": "relu"}
    assert config_from_torchscale(as_dict) == ours
    # "decoder." prefixes (a wrapping language model) are stripped.
    prefixed = {f"decoder.{k}": v for k, v in ts_state.items()}
    again = RetNet.from_torchscale(prefixed, as_dict)
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_float32_unpatched_torchscale_matches_closely() -> None:
    """torchscale as users run it (float32, its own float32 casts), at its default eps."""
    decoder, config = build_torchscale(seed=3, float64=False, decoder_value_embed_dim=64)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, _ = decoder(ids)
        model = RetNet.from_torchscale(decoder.state_dict(), config)
        assert model.dtype == torch.float32
        eps0_decoder, eps0_config = build_torchscale(seed=3, float64=False, layernorm_eps=0.0)
        eps0_expected, _ = eps0_decoder(ids)
        eps0 = RetNet.from_torchscale(eps0_decoder.state_dict(), eps0_config)
        for mode in ("parallel", "chunkwise", "recurrent"):
            assert rel(eps0(ids, mode=mode, chunk_size=8).logits, eps0_expected) < 1e-4
            # At the default eps (1e-6) torchscale's rescaled intermediates meet the eps at a
            # different magnitude: a small, bounded difference (measured in docs/model.md).
            diff = rel(model(ids, mode=mode, chunk_size=8).logits, expected)
            assert 0 < diff < 0.05, (mode, diff)


def test_default_eps_difference_vanishes_with_eps(float64_torchscale: None) -> None:
    """The only difference at eps > 0 is the eps: it shrinks to rounding as eps -> 0."""
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    diffs = []
    for eps in (1e-5, 1e-7, 1e-9):
        decoder, config = build_torchscale(seed=6, layernorm_eps=eps)
        with torch.no_grad():
            expected, _ = decoder(ids)
            diffs.append(rel(RetNet.from_torchscale(decoder.state_dict(), config)(ids).logits, expected))
    assert diffs[0] > diffs[1] > diffs[2] and diffs[2] < 1e-4, diffs


@pytest.mark.parametrize(
    ("option", "value"),
    [("moe_freq", 2), ("multiway", True), ("drop_path_rate", 0.1), ("no_output_layer", True),
     ("use_xmoe", True), ("activation_fn", "tanh")],
)
def test_unsupported_options_name_the_option(option: str, value: object) -> None:
    fields = {"decoder_embed_dim": 32, "decoder_value_embed_dim": 64, "decoder_retention_heads": 4,
              "decoder_ffn_embed_dim": 48, "decoder_layers": 2, "vocab_size": VOCAB, option: value}
    with pytest.raises(ValueError, match=option):
        config_from_torchscale(fields)


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="decoder_value_embed_dim"):
        # torchscale's own defaults: value dim 1280 over 3 heads (its model crashes on them).
        config_from_torchscale(ts_config.RetNetConfig(vocab_size=10))
    with pytest.raises(ValueError, match="vocab_size"):
        config_from_torchscale({"decoder_value_embed_dim": 768, "decoder_retention_heads": 4})
    with pytest.raises(ValueError, match="not_an_option"):
        config_from_torchscale({"vocab_size": 10, "not_an_option": 1})
    with pytest.raises(TypeError, match="config"):
        RetNet.from_torchscale({}, RetNetConfig())
    with pytest.raises(TypeError, match="state_dict"):
        RetNet.from_torchscale([], {"vocab_size": 10})  # type: ignore[arg-type]


def test_state_dict_not_matching_config_lists_keys() -> None:
    decoder, config = build_torchscale(float64=False)
    state = decoder.state_dict()
    missing = {k: v for k, v in state.items() if k != "layers.1.ffn.gate.weight"}
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.gate\.weight"):
        RetNet.from_torchscale(missing, config)
    extra = {**state, "layers.2.ffn.fc1.weight": state["layers.0.ffn.fc1.weight"]}
    with pytest.raises(ValueError, match=r"layers\.2\.ffn\.fc1\.weight"):
        RetNet.from_torchscale(extra, config)
    wrong_shape = {**state, "layers.0.retention.v_proj.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match=r"layers\.0\.retention\.v_proj\.weight"):
        RetNet.from_torchscale(wrong_shape, config)
    # Weights of a 3-layer model under a 2-layer config: unexpected keys named.
    deeper, _ = build_torchscale(float64=False, decoder_layers=3)
    with pytest.raises(ValueError, match=r"layers\.2\."):
        RetNet.from_torchscale(deeper.state_dict(), config)
    # A different decay schedule in the saved buffers would silently change the model.
    odd_decay = {**state, "retnet_rel_pos.decay": state["retnet_rel_pos.decay"] * 2}
    with pytest.raises(ValueError, match=r"retnet_rel_pos\.decay"):
        RetNet.from_torchscale(odd_decay, config)


def test_recurrent_decoding_matches_torchscale_incremental_float64_eps0(float64_torchscale: None) -> None:
    """torchscale's own recurrent path (a token at a time) against our prefill + steps."""
    decoder, config = build_torchscale(seed=7, layernorm_eps=0.0, share_decoder_input_output_embed=True)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        incremental: dict[object, object] = {}
        expected = torch.cat([decoder(ids[:, : t + 1], incremental_state=incremental)[0] for t in range(12)], 1)
        model = RetNet.from_torchscale(decoder.state_dict(), config)
        out = model(ids[:, :5], mode="chunkwise", chunk_size=2)
        logits = [out.logits]
        state = out.state
        for t in range(5, 12):
            step = model(ids[:, t : t + 1], state=state)
            logits.append(step.logits)
            state = step.state
    assert rel(torch.cat(logits, 1), expected) < 1e-9
