"""The architecture options fla's RetNets need, against the float64 reference and each other.

``rotation="rope"`` (GPT-NeoX frequencies, float32 angles), ``head_norm_weight`` (one learned
``(dv,)`` weight on the RMS head norm, shared by the heads) and the SwiGLU MLP (``ffn="glu"``,
``activation="swish"``): every form of the layer against ``tests/reference.py`` in float64, and
every form, the fast decoding step and its one-call kernels of the model against each other.
"""

from __future__ import annotations

import pytest
import torch
from reference import F64, reference_msr, reference_rotate, rel_err

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.layers.retention import MultiScaleRetention
from yet_another_retnet.ops.position import halves_to_pairs, pairs_to_halves, rotation_tables

FORMS = ("parallel", "chunkwise", "recurrent")
FLA_LIKE = {"rotation": "rope", "head_norm": "rmsnorm", "head_norm_weight": True, "ffn": "glu",
            "activation": "swish", "block_norm": "rmsnorm", "tie_embeddings": False, "dropout": 0.0}


def _layer(**kw):
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, 2, dtype=F64, head_norm="rmsnorm", **kw)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize(("rotation", "weight"), [("rope", True), ("rope", False), ("xpos", True)])
def test_layer_forms_match_float64_reference(rotation, weight):
    layer = _layer(rotation=rotation, head_norm_weight=weight)
    assert (layer.head_weight is not None) == weight
    x = torch.randn(2, 11, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref_y, ref_memory = reference_msr(layer, x)
    for form in FORMS:
        if form == "recurrent":
            state, ys = None, []
            for t in range(11):
                y_t, state = layer.forward_recurrent(x[:, t], x[:, t], x[:, t], state)
                ys.append(y_t)
            y = torch.stack(ys, 1)
        elif form == "chunkwise":
            y, state = layer.forward_chunkwise(x, x, x, chunk_size=4)
        else:
            y, state, _ = layer.retain(x, x, x, None, "parallel")
        assert rel_err(y, ref_y) <= 1e-10, form
        assert rel_err(state.memory, ref_memory) <= 1e-10, form


def test_rope_is_not_xpos_and_halves_permutation_round_trips():
    x = torch.randn(1, 2, 5, 8, dtype=F64)
    pos = torch.arange(5)[None]
    assert rel_err(reference_rotate(x, pos, "rope"), reference_rotate(x, pos, "xpos")) > 1e-3
    cos, _ = rotation_tables(torch.arange(3), 8, torch.float32, "rope")
    # GPT-NeoX's frequencies, 10000^(-2i/dk), at position 1
    expected = torch.cos(1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    torch.testing.assert_close(cos[1, 0::2], expected, rtol=0, atol=0)
    w = torch.randn(16, 5)
    assert torch.equal(pairs_to_halves(halves_to_pairs(w, 2), 2), w)
    assert torch.equal(halves_to_pairs(w, 2)[1], w[4])  # head 0: feature dk/2 pairs with feature 0


def test_config_validates_the_options():
    with pytest.raises(ValueError, match="rotation"):
        RetNetConfig(rotation="neox")
    with pytest.raises(ValueError, match="head_norm_weight"):
        RetNetConfig(head_norm_weight=True)  # the default head norm is the group norm
    with pytest.raises(ValueError, match="head_norm_weight"):
        RetNetConfig(head_norm="rmsnorm", head_norm_weight=1)
    assert RetNetConfig().rotation == "xpos" and not RetNetConfig().head_norm_weight


def _model(dtype, **kw):
    config = RetNetConfig(vocab_size=61, d_model=32, num_heads=2, num_layers=2, ffn_dim=48, **{**FLA_LIKE, **kw})
    torch.manual_seed(0)
    model = RetNet(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_model_forms_and_decoding_agree(dtype, tol):
    model = _model(dtype)
    ids = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids, mode="parallel").logits
        for mode in ("chunkwise", "recurrent"):
            assert rel_err(model(ids, mode=mode, chunk_size=8).logits, ref) <= tol, mode
        # chunked prefill, then the fast decoding step (the one-call layer kernels where built)
        out = model(ids[:, :20], mode="chunkwise", chunk_size=8)
        logits = [out.logits]
        state = out.state
        for t in range(20, 37):
            out = model(ids[:, t : t + 1], state=state)
            logits.append(out.logits)
            state = out.state
        assert rel_err(torch.cat(logits, 1), ref) <= tol
        # single rows take the one-call kernel path for float32
        row = model(ids[:1, :5], mode="recurrent").state
        one = model(ids[:1, 5:6], state=row).logits
        assert rel_err(one, ref[:1, 5:6]) <= tol


def test_head_weight_reaches_every_path():
    model = _model(torch.float32)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids[:, :8]).state
        step_before = model(ids[:, 8:], state=before).logits
        for layer in model.decoder.layers:
            layer.retention.head_weight.mul_(2.0).add_(0.5)  # in place: cached copies must notice
        after_full = model(ids, mode="parallel").logits
        state = model(ids[:, :8]).state
        step_after = model(ids[:, 8:], state=state).logits
    assert rel_err(step_after, after_full[:, 8:]) <= 2e-5
    assert rel_err(step_after, step_before) > 1e-3


def test_fla_preset_has_fla_hub_parameter_count():
    from yet_another_retnet.models import count_parameters
    from yet_another_retnet.models.fla import config_from_fla, config_to_fla

    config = RetNetConfig.from_preset("fla-1.3b")
    assert count_parameters(config) == 1_351_727_104  # fla-hub/retnet-1.3B-100B's model card
    hub = {"model_type": "retnet", "hidden_size": 2048, "num_heads": 8, "num_hidden_layers": 24, "expand_k": 1,
           "expand_v": 2, "hidden_ratio": 2, "intermediate_size": None, "vocab_size": 32000, "norm_eps": 1e-6,
           "elementwise_affine": True, "fuse_norm": True, "tie_word_embeddings": False}
    assert config_from_fla(hub) == config
    assert config_from_fla(config_to_fla(config)) == config
