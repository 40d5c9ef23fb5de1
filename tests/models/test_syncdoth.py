"""syncdoth/RetNet checkpoints: ``retnet convert --from syncdoth`` and ``from_syncdoth``.

syncdoth's ``RetNetForCausalLM`` is torchscale 0.3.0's RetNet under other names (``model.``
prefix, ``lm_head``) with a Hugging Face-style ``config.json``; its one extra option that changes
the network, ``use_lm_decay``, only changes the ``retnet_rel_pos.decay`` buffer, which torchscale's
forward reads at run time. So the oracle is the real torchscale 0.3.0 ``RetNetDecoder``: its
weights are written out in syncdoth's format (safetensors, or ``pytorch_model.bin``), converted,
and the converted model's logits in all three forms are compared with torchscale's own forward
(with ``use_lm_decay``, torchscale runs with syncdoth's decays in its buffer, computed here from
syncdoth's formula). In float64 with the norms' eps at 0, where the two models' row
normalizations cancel exactly (see ``models/syncdoth.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from yet_another_retnet import RetNet
from yet_another_retnet.bench.common import shim_timm
from yet_another_retnet.cli import main
from yet_another_retnet.models.syncdoth import config_from_syncdoth, from_syncdoth

pytest.importorskip("fairscale")
shim_timm()
ts_retnet = pytest.importorskip("torchscale.architecture.retnet")
ts_config = pytest.importorskip("torchscale.architecture.config")
ts_rms = pytest.importorskip("torchscale.component.rms_norm")
ts_glu = pytest.importorskip("torchscale.component.gate_linear_unit")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 53


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def float64_torchscale(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchscale's RMSNorm and GLU without their ``.float()`` casts (same formulas), so the
    oracle computes in float64 throughout."""

    def rms_forward(self, x):  # type: ignore[no-untyped-def]
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * self.weight if self.weight is not None else out

    def glu_forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc2(self.activation_fn(self.fc1(x)) * self.gate(x))

    monkeypatch.setattr(ts_rms.RMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ts_glu.GLU, "forward", glu_forward)


def syncdoth_lm_decay(heads: int) -> torch.Tensor:
    """syncdoth's ``use_lm_decay`` log-decays: log(1 - exp(linspace(log 1/32, log 1/512, heads)))."""
    start, end = math.log(1 / 32), math.log(1 / 512)
    return torch.log(1 - torch.exp(torch.linspace(start, end, heads, dtype=torch.float64)))


def build(options: dict[str, object], lm_decay: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    """A torchscale RetNetDecoder in float64 and the syncdoth config.json describing it."""
    fields: dict[str, object] = {
        "decoder_embed_dim": 32, "decoder_value_embed_dim": 64, "decoder_retention_heads": 4,
        "decoder_ffn_embed_dim": 48, "decoder_layers": 2, "vocab_size": VOCAB, "layernorm_eps": 0.0,
        "activation_fn": "swish",
    }
    fields.update(options)
    tied = bool(fields.pop("tie_word_embeddings", False))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torchscale makes its angles in the default dtype
    try:
        config = ts_config.RetNetConfig(**fields, share_decoder_input_output_embed=tied)
        decoder = ts_retnet.RetNetDecoder(config, embed_tokens=torch.nn.Embedding(VOCAB, 32))
    finally:
        torch.set_default_dtype(previous)
    heads = torch.arange(config.decoder_retention_heads, dtype=torch.float64)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:  # away from 1, so a dropped or swapped norm shows
                p.mul_(1 + 0.3 * torch.randn_like(p))
        decoder.double()
        decay = syncdoth_lm_decay(len(heads)) if lm_decay else torch.log(1 - 2 ** (-5 - heads))
        decoder.retnet_rel_pos.decay.copy_(decay)
    # What syncdoth's RetNetConfig.save_pretrained writes (its fields and Hugging Face's usual ones).
    syncdoth_config = {
        **{k: v for k, v in fields.items() if k != "vocab_size"}, "vocab_size": VOCAB,
        "model_type": "retnet", "architectures": ["RetNetForCausalLM"], "transformers_version": "4.35.0",
        "decoder_normalize_before": bool(config.decoder_normalize_before), "deepnorm": bool(config.deepnorm),
        "subln": bool(config.subln), "layernorm_embedding": bool(config.layernorm_embedding),
        "no_scale_embedding": bool(config.no_scale_embedding), "use_lm_decay": lm_decay, "use_glu": True,
        "use_ffn_rms_norm": False, "z_loss_coeff": 0.0, "forward_impl": "parallel", "recurrent_chunk_size": 512,
        "tie_word_embeddings": tied, "initializer_range": 0.02, "drop_path_rate": 0.0, "dropout": 0.0,
        "activation_dropout": 0.0, "output_retentions": False, "use_cache": True, "is_decoder": True,
        "pad_token_id": 0, "eos_token_id": 0, "torch_dtype": "float64",
    }
    return decoder.eval(), syncdoth_config


def syncdoth_state(decoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchscale's names as syncdoth stores them: the decoder under ``model.``, its output
    projection as ``lm_head`` (the rotation and decay buffers included, as syncdoth saves them)."""
    out = {}
    for name, t in decoder.state_dict().items():
        out["lm_head.weight" if name == "output_projection.weight" else f"model.{name}"] = t.clone()
    return out


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: dict[str, object], kind: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if kind == "safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    elif kind == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:  # two pytorch_model shards with Hugging Face's index
        names = sorted(state)
        parts = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, part in parts.items():
            torch.save({n: state[n] for n in part}, directory / file)
        index = {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


CASES = {
    "untied,safetensors": ({}, False, "safetensors"),
    "tied+scaled+embnorm,bin": ({"tie_word_embeddings": True, "no_scale_embedding": False,
                                 "layernorm_embedding": True}, False, "bin"),
    "lm_decay,value=embed,gelu,sharded bin": ({"decoder_value_embed_dim": 32, "activation_fn": "gelu"}, True,
                                              "sharded"),
    "deepnorm(post-norm),lm_decay,safetensors": ({"deepnorm": True, "subln": False}, True, "safetensors"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_syncdoth_checkpoint_matches_torchscale_in_all_forms(
        case: str, tmp_path: Path, float64_torchscale: None) -> None:
    options, lm_decay, kind = CASES[case]
    decoder, config = build(options, lm_decay, seed=len(case))
    src = write_checkpoint(tmp_path / "syncdoth", syncdoth_state(decoder), config, kind)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, _ = decoder(ids)
    out = tmp_path / "ours"
    assert main(["convert", "--from", "syncdoth", str(src), str(out)]) == 0
    for model in (RetNet.from_pretrained(out), RetNet.from_syncdoth(src)):
        assert model.dtype == torch.float64
        assert model.config.decay == ("log-spaced" if lm_decay else "eq8")
        with torch.no_grad():
            for mode in ("parallel", "chunkwise", "recurrent"):
                got = model(ids, mode=mode, chunk_size=4).logits
                assert rel(got, expected) < 1e-9, (case, mode, rel(got, expected))
            first = model(ids[:, :8], mode="chunkwise", chunk_size=3)  # a prompt, then token by token
            rest = model(ids[:, 8:], state=first.state, mode="recurrent").logits
            assert rel(rest, expected[:, 8:]) < 1e-9


def test_a_state_dict_loads_and_float32_matches_unpatched_torchscale(tmp_path: Path) -> None:
    """The in-memory path, and torchscale as shipped (its float32 casts) at float32 tolerance.

    At eps 0: with eps > 0 torchscale's (and syncdoth's) row divisions change the eps its head
    norm effectively applies, per position, so imported models differ from it by up to ~1% of
    the logits (measured in docs/model.md), as torchscale's own forms differ from each other."""
    decoder, config = build({"layernorm_eps": 0.0}, lm_decay=False)
    decoder.float()
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, _ = decoder(ids)
        model = from_syncdoth(RetNet, syncdoth_state(decoder), config)
        assert model.dtype == torch.float32
        got = model(ids).logits
    assert rel(got, expected) < 1e-5
    half = from_syncdoth(RetNet, syncdoth_state(decoder), config, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def _fails_cleanly(capsys: pytest.CaptureFixture[str], src: Path, out: Path, needle: str) -> None:
    capsys.readouterr()
    assert main(["convert", "--from", "syncdoth", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retnet: error:") and needle in err[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


class _NotATensor:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("a pickle that runs code",))


def test_what_syncdoth_can_express_and_we_cannot_is_refused_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    decoder, config = build({}, lm_decay=False)
    state = syncdoth_state(decoder)
    out = tmp_path / "out"

    def variant(name: str, new_config: dict[str, object], new_state: dict[str, torch.Tensor],
                kind: str = "safetensors") -> Path:
        return write_checkpoint(tmp_path / name, new_state, new_config, kind)

    _fails_cleanly(capsys, variant("mlp", {**config, "use_glu": False}, state), out, "use_glu")
    _fails_cleanly(capsys, variant("unknown", {**config, "use_xpos": True}, state), out, "use_xpos")
    _fails_cleanly(capsys, variant("lmdecay", {**config, "use_lm_decay": True}, state), out, "use_lm_decay")
    _fails_cleanly(capsys, variant("heads", {**config, "decoder_retention_heads": 3}, state), out,
                   "decoder_retention_heads")
    tp = {**state, "model.layers.0.retention.decay_proj.weight": torch.eye(4, dtype=torch.float64)}
    _fails_cleanly(capsys, variant("tp", config, tp), out, "decay_proj")
    old = {**state, "model.layers.0.retention_layer_norm.bias": torch.zeros(32, dtype=torch.float64)}
    _fails_cleanly(capsys, variant("layernorm", config, old), out, "LayerNorm")
    missing = {k: v for k, v in state.items() if k != "model.layers.1.ffn.gate.weight"}
    _fails_cleanly(capsys, variant("missing", config, missing), out, "model.layers.1.ffn.gate.weight")
    wide = {**state, "model.layers.0.ffn.fc1.weight": torch.zeros(50, 32, dtype=torch.float64)}
    _fails_cleanly(capsys, variant("shape", config, wide), out, "model.layers.0.ffn.fc1.weight")
    hostile = {**state, "model.extra": _NotATensor()}
    _fails_cleanly(capsys, variant("pickle", config, hostile, kind="bin"), out, "weights_only")  # type: ignore[arg-type]
    capsys.readouterr()
    assert main(["convert", "--from", "syncdoth", "--to", "syncdoth", str(variant("ok", config, state)), str(out)]) == 2
    assert "read, not written" in capsys.readouterr().err
    with pytest.raises(ValueError, match="use_glu"):
        config_from_syncdoth({**config, "use_glu": False})
    # Training-only settings do not change the function and are accepted.
    assert config_from_syncdoth({**config, "drop_path_rate": 0.1, "z_loss_coeff": 1e-4}).num_layers == 2
