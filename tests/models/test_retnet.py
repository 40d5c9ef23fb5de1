"""The RetNet language model: config, forward forms, resumed states, loss, gradients, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import float32_tol

from yet_another_retnet import RetNet, RetNetConfig, RetNetState
from yet_another_retnet.models import PRESETS, count_parameters

MODES = ("parallel", "chunkwise", "recurrent")
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def make_model(seed: int = 0, dtype: torch.dtype = F64, **overrides: object) -> RetNet:
    fields: dict[str, object] = {
        "vocab_size": 37, "d_model": 16, "num_heads": 2, "num_layers": 2, "ffn_dim": 24, "dropout": 0.0,
        "chunk_size": 4,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = RetNet(RetNetConfig(**fields)).to(dtype).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        # Norm weights and biases start at 1 and 0: move them so every parameter matters.
        for name, p in model.named_parameters():
            if "norm" in name:  # drawn in float64 whatever the dtype: the same model in each
                p.add_(0.2 * torch.randn(p.shape, dtype=F64).to(p.dtype))
    return model


def ids(batch: int, length: int, vocab: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# RetNetConfig
# ------------------------------------------------------------------------------------------------


def test_config_is_a_dataclass_with_json_round_trip(tmp_path: Path) -> None:
    config = RetNetConfig(vocab_size=100, d_model=64, num_heads=4, value_factor=1.5, ffn="glu",
                          block_norm="rmsnorm", head_norm="rmsnorm", embed_scale=8.0, pre_norm=False)
    assert dataclasses.is_dataclass(config)
    text = config.to_json()
    assert json.loads(text)["value_factor"] == 1.5
    assert RetNetConfig.from_json(text) == config
    config.to_json(tmp_path / "c.json")
    assert RetNetConfig.from_json(tmp_path / "c.json") == config
    with pytest.warns(DeprecationWarning, match="from_json_file"):  # a str path: still read, deprecated
        assert RetNetConfig.from_json(str(tmp_path / "c.json")) == config
    assert RetNetConfig.from_dict(config.to_dict()) == config
    assert RetNetConfig.from_preset("tiny", num_layers=1).num_layers == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("vocab_size", 0), ("d_model", -8), ("num_heads", 3), ("num_layers", 1.5), ("ffn_dim", True),
     ("value_factor", 0.3), ("dropout", 1.0), ("activation_dropout", -0.1), ("ffn", "moe"),
     ("activation", "tanh"), ("block_norm", "batchnorm"), ("head_norm", "none"), ("decay", "linear"),
     ("norm_eps", -1.0), ("embed_scale", float("nan")), ("residual_scale", float("inf")),
     ("tie_embeddings", "yes"), ("pre_norm", 1), ("chunk_size", 0), ("gate_activation", "tanh")],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RetNetConfig(**{"d_model": 64, "num_heads": 4, field: value})  # type: ignore[arg-type]


def test_config_rejects_unknown_fields_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not_a_field"):
        RetNetConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="JSON"):
        RetNetConfig.from_json("{not json")
    with pytest.raises(ValueError, match="preset"):
        RetNetConfig.from_preset("13b")
    with pytest.raises(ValueError, match="relative_position"):
        RetNetConfig(d_model=30, num_heads=10)  # odd key head dim cannot be rotated


def expected_parameters(c: RetNetConfig) -> int:
    """Counted by hand from the architecture (independent of the module tree)."""
    d, v, f = c.d_model, int(c.d_model * c.value_factor), c.ffn_dim
    norm = (2 * d if c.bias else d) if c.block_norm == "layernorm" else d
    retention = 2 * d * d + 2 * d * v + v * d + (2 * v if c.head_norm == "groupnorm" else 0)
    if c.bias:
        retention += 2 * d + 2 * v + d
    ffn = (3 if c.ffn == "glu" else 2) * d * f + ((2 * f + d if c.ffn == "glu" else f + d) if c.bias else 0)
    layer = 2 * norm + retention + ffn
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.num_layers * layer + norm + head + (norm if c.embedding_norm else 0)


@pytest.mark.parametrize(("name", "nominal"), [("1.3b", 1.3e9), ("2.7b", 2.7e9), ("6.7b", 6.7e9)])
def test_paper_presets_have_their_nominal_size(name: str, nominal: float) -> None:
    config = RetNetConfig.from_preset(name)
    assert config.vocab_size == 50000
    count = count_parameters(config)  # meta device: nothing allocated
    assert count == expected_parameters(config)
    assert abs(count / nominal - 1) < 0.10, (name, count)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": False, "bias": True, "ffn": "glu"},
    {"block_norm": "rmsnorm", "head_norm": "rmsnorm", "embedding_norm": True, "value_factor": 1.0},
])
def test_count_parameters_matches_a_real_model(overrides: dict[str, object]) -> None:
    config = dataclasses.replace(RetNetConfig.from_preset("tiny"), **overrides)
    assert count_parameters(config) == RetNet(config).num_parameters() == expected_parameters(config)
    assert set(PRESETS) >= {"1.3b", "2.7b", "6.7b"}


# ------------------------------------------------------------------------------------------------
# Forward: outputs, loss, the three forms
# ------------------------------------------------------------------------------------------------


def test_forward_outputs_and_loss() -> None:
    model = make_model()
    x = ids(3, 11)
    labels = ids(3, 11, seed=2)
    labels[0, 3:6] = -100
    labels[2, -1] = -100
    out = model(x, labels=labels)
    assert out.logits.shape == (3, 11, 37) and out.logits.dtype == F64
    assert isinstance(out.state, RetNetState) and out.state.position.tolist() == [11, 11, 11]
    assert len(out.state.memories) == 2 and out.state.memories[0].shape == (3, 2, 8, 16)
    # Next-token loss: logits at t predict labels at t + 1; -100 ignored.
    flat_logits = out.logits[:, :-1].reshape(-1, 37)
    flat_labels = labels[:, 1:].reshape(-1)
    keep = flat_labels != -100
    manual = F.cross_entropy(flat_logits[keep], flat_labels[keep])
    assert out.loss is not None and out.loss.dtype == F64  # a float64 model's loss is not rounded to float32
    torch.testing.assert_close(out.loss, manual, rtol=1e-12, atol=1e-12)
    assert model(x).loss is None


CONFIGS = {
    "paper": {},
    "torchscale-like": {"ffn": "glu", "block_norm": "rmsnorm", "head_norm": "rmsnorm", "embed_scale": 4.0,
                        "embedding_norm": True, "tie_embeddings": False, "activation": "swish"},
    "value_factor 1, log-spaced, bias": {"value_factor": 1.0, "decay": "log-spaced", "bias": True},
    "no rotation, post-norm": {"relative_position": False, "pre_norm": False, "residual_scale": 1.5},
    "three heads": {"d_model": 24, "num_heads": 3, "value_factor": 0.5},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-9), (torch.float32, 1e-4)])
def test_every_form_gives_the_same_logits(name: str, dtype: torch.dtype, tol: float, device: torch.device) -> None:
    model = make_model(dtype=dtype, **CONFIGS[name]).to(device)
    x = ids(2, 13).to(device)
    if dtype == torch.float32:
        tol = float32_tol(device, tol)
    reference = model(x, mode="parallel").logits
    for mode, chunk in [("chunkwise", 4), ("chunkwise", 5), ("chunkwise", 13), ("chunkwise", 64),
                        ("recurrent", None), (None, None), (None, 3)]:
        got = model(x, mode=mode, chunk_size=chunk).logits
        assert got.dtype == dtype and got.device == x.device
        assert rel(got, reference) < tol, (name, mode, chunk, rel(got, reference))


@pytest.mark.parametrize("name", ["paper", "torchscale-like"])
def test_resumed_state_equals_one_call_at_any_split_in_any_mode_pair(name: str) -> None:
    model = make_model(**CONFIGS[name])
    length = 9
    x = ids(2, length, seed=3)
    with torch.no_grad():
        whole = model(x, mode="parallel")
        for split, first, second in itertools.product(range(length + 1), MODES, MODES):
            a = model(x[:, :split], mode=first, chunk_size=3)
            b = model(x[:, split:], state=a.state, mode=second, chunk_size=2)
            joined = torch.cat([a.logits, b.logits], dim=1)
            assert rel(joined, whole.logits) < 1e-9, (split, first, second)
            if split < length:  # the positions right after the split
                assert rel(b.logits[:, :1], whole.logits[:, split:split + 1]) < 1e-9
            assert torch.equal(b.state.position, whole.state.position)
            for got, want in zip(b.state.memories, whole.state.memories, strict=True):
                assert rel(got, want) < 1e-9, (split, first, second)


def test_three_segments_and_float32_resume() -> None:
    model = make_model(dtype=torch.float32)
    x = ids(1, 21, seed=4)
    with torch.no_grad():
        whole = model(x).logits
        s1 = model(x[:, :6], mode="chunkwise", chunk_size=4)
        s2 = model(x[:, 6:7], state=s1.state, mode="recurrent")
        s3 = model(x[:, 7:], state=s2.state, mode="parallel")
    assert rel(torch.cat([s1.logits, s2.logits, s3.logits], 1), whole) < 1e-4


def test_gradients_in_chunkwise_equal_parallel(device: torch.device) -> None:
    model = make_model(ffn="glu", block_norm="rmsnorm", tie_embeddings=False).to(device)
    x = ids(2, 11, seed=5).to(device)
    labels = ids(2, 11, seed=6).to(device)
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(x, mode=mode, chunk_size=4, labels=labels).loss.backward()  # type: ignore[union-attr]
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads["parallel"]) == {n for n, _ in model.named_parameters()}
    for name, g in grads["parallel"].items():
        assert g.abs().max() > 0, name
        assert rel(grads["chunkwise"][name], g) < 1e-9, name


def test_gradient_through_a_resumed_state(device: torch.device) -> None:
    model = make_model().to(device)
    x = ids(1, 8, seed=7).to(device)
    a = model(x[:, :5], mode="chunkwise", chunk_size=2)
    b = model(x[:, 5:], state=a.state, mode="recurrent")
    b.logits.sum().backward()
    whole_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, mode="parallel").logits[:, 5:].sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None
        assert rel(whole_grads[n], p.grad) < 1e-9, n


def test_left_padded_forward_matches_each_row_alone() -> None:
    model = make_model()
    prompts = [ids(1, n, seed=10 + n)[0] for n in (7, 4, 1)]
    width = 7
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    for mode in MODES:
        out = model(batch, attention_mask=mask, mode=mode, chunk_size=3)
        for i, p in enumerate(prompts):
            alone = model(p[None], mode="parallel")
            assert rel(out.logits[i, width - len(p):], alone.logits[0]) < 1e-9, (mode, i)
            assert int(out.state.position[i]) == len(p)
            for got, want in zip(out.state.memories, alone.state.memories, strict=True):
                assert rel(got[i], want[0]) < 1e-9


def test_right_and_both_side_padded_rows_match_each_row_alone() -> None:
    """Padding after a row's real tokens (what transformers' collators make), alone or with
    padding before them too: the real tokens' logits, the state and the loss (labels -100 on the
    padding) are each row's own, in every mode, gradients included."""
    model = make_model()
    width = 8
    runs = [(0, 8), (0, 5), (2, 6), (3, 1)]  # (padding before, real tokens) per row
    prompts = [ids(1, n, seed=20 + i)[0] for i, (_, n) in enumerate(runs)]
    batch = torch.full((len(runs), width), 5, dtype=torch.long)  # padding holds a real token id
    mask = torch.zeros(len(runs), width, dtype=torch.long)
    labels = torch.full((len(runs), width), -100, dtype=torch.long)
    for i, ((before, n), p) in enumerate(zip(runs, prompts, strict=True)):
        batch[i, before:before + n] = p
        mask[i, before:before + n] = 1
        labels[i, before + 1:before + n] = p[1:]  # a row's first token is predicted by nothing of its own
    scored = sum(n - 1 for _, n in runs)
    for mode in MODES:
        model.zero_grad()
        out = model(batch, attention_mask=mask, mode=mode, chunk_size=3, labels=labels)
        out.loss.backward()
        padded_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        total = torch.zeros((), dtype=F64)
        for i, ((before, n), p) in enumerate(zip(runs, prompts, strict=True)):
            alone = model(p[None], mode="parallel", labels=p[None])
            assert rel(out.logits[i, before:before + n], alone.logits[0]) < 1e-9, (mode, i)
            assert int(out.state.position[i]) == n
            for got, want in zip(out.state.memories, alone.state.memories, strict=True):
                assert rel(got[i], want[0]) < 1e-9, (mode, i)
            if n > 1:
                total = total + alone.loss * (n - 1)
        assert abs(float(out.loss) - float(total / scored)) < 1e-12, mode
        (total / scored).backward()
        for name, p in model.named_parameters():
            assert rel(padded_grads[name], p.grad) < 1e-9, (mode, name)


def test_bfloat16_model_runs_and_tracks_float32(device: torch.device) -> None:
    model = make_model(dtype=torch.float32).to(device)
    x = ids(1, 40, seed=8).to(device)
    reference = model(x).logits
    low = make_model(dtype=torch.bfloat16).to(device)
    for mode in MODES:
        got = low(x, mode=mode, chunk_size=16).logits
        assert got.dtype == torch.bfloat16 and got.device == x.device and torch.isfinite(got).all()
        assert rel(got.float(), reference) < 0.1, mode
    # The prefill's last layer (keys and values only, rotated without complex numbers in
    # bfloat16) gives the full forward's last logits and state.
    full = low(x, mode="chunkwise", chunk_size=16)
    pre = low.prefill(x, chunk_size=16)
    assert pre.logits.dtype == torch.bfloat16
    assert rel(pre.logits.float(), full.logits[:, -1:].float()) < 0.02
    for got_m, want_m in zip(pre.state.memories, full.state.memories, strict=True):
        assert got_m.dtype == want_m.dtype == torch.float32
        assert rel(got_m, want_m) < 0.02


# ------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, never a silent wrong answer
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_with_the_argument_named() -> None:
    model = make_model()
    x = ids(2, 5)
    with pytest.raises(IndexError, match="input_ids"):
        model(torch.tensor([[0, 37]]))
    with pytest.raises(IndexError, match="input_ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(x.float())
    with pytest.raises(TypeError, match="input_ids"):
        model(x.bool())
    with pytest.raises(TypeError, match="input_ids"):
        model([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_ids"):
        model(x[0])
    with pytest.raises(ValueError, match="mode"):
        model(x, mode="attention")
    with pytest.raises(ValueError, match="chunk_size"):
        model(x, mode="chunkwise", chunk_size=0)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]))  # a hole in the row
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.tensor([[0, 1, 0, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :3])
    with pytest.raises(TypeError, match="labels"):
        model(x, labels=x.float())


def test_foreign_states_are_rejected() -> None:
    model = make_model()
    state = model(ids(2, 5)).state
    with pytest.raises(ValueError, match="batch size"):
        model(ids(3, 2), state=state)
    deeper = make_model(num_layers=3)
    with pytest.raises(ValueError, match="state"):
        deeper(ids(2, 2), state=state)
    wider = make_model(d_model=24, num_heads=3)
    with pytest.raises(ValueError, match="state"):
        wider(ids(2, 2), state=state)
    with pytest.raises(TypeError, match="state"):
        model(ids(2, 2), state=state.memories)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(2, 2), state=state, attention_mask=torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(2, 2), state=state, attention_mask=torch.tensor([[1, 0], [1, 1]]))


def test_autocast_keeps_retention_in_float32_and_forms_agree() -> None:
    """Under bf16 autocast the retention math (and so the state) stays float32 in every form."""
    torch.manual_seed(11)
    model = RetNet(RetNetConfig(d_model=64, num_heads=4, num_layers=2, ffn_dim=128, dropout=0.0)).eval()
    ids = torch.randint(0, 256, (2, 40))
    outs = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mode in ("parallel", "chunkwise", "recurrent"):
            outs[mode] = model(ids, mode=mode, chunk_size=16)
    for mode, out in outs.items():
        assert all(m.dtype == torch.float32 for m in out.state.memories), mode
    ref = outs["parallel"].state.memories[1]
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].state.memories[1], ref, rtol=2e-2, atol=2e-2)


def test_inputs_embeds_give_what_the_ids_they_embed_give() -> None:
    """``inputs_embeds`` = ``embed_tokens(ids)``: the same logits, states and loss as the ids in
    every mode (with the embedding scale and norm applied after, as for ids), left and right
    padding, packed documents and a continued state; gradients reach the embeddings."""
    model = make_model(embed_scale=1.7, embedding_norm=True, tie_embeddings=False)
    x = ids(3, 9, seed=40)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    resets = torch.zeros(3, 9, dtype=torch.bool)
    resets[:, [0, 4]] = True
    embeds = model.embed_tokens(x).detach()
    for mode in MODES:
        for extra in ({}, {"attention_mask": mask}, {"reset_mask": resets}):
            want = model(x, mode=mode, chunk_size=4, labels=x, **extra)
            got = model(inputs_embeds=embeds, mode=mode, chunk_size=4, labels=x, **extra)
            assert rel(got.logits, want.logits) < 1e-12 and abs(float((got.loss - want.loss).detach())) < 1e-12, (mode, extra)
            for a, b in zip(got.state.memories, want.state.memories, strict=True):
                assert rel(a, b) < 1e-12, (mode, extra)
            assert torch.equal(got.state.position, want.state.position)
    with torch.no_grad():  # one token on a state: the decoding step for ids, the layers for embeddings
        state = model(x[:, :8]).state
        step = model(x[:, 8:], state=state)
        assert rel(model(inputs_embeds=embeds[:, 8:], state=state).logits, step.logits) < 1e-12
    # Gradients: each embedding's gradient is what the table's row gets from that position.
    model.zero_grad()
    model(x, labels=x).loss.backward()
    table = model.embed_tokens.weight.grad.clone()
    leaf = embeds.clone().requires_grad_(True)
    model(inputs_embeds=leaf, labels=x).loss.backward()
    summed = torch.zeros_like(table).index_add_(0, x.reshape(-1), leaf.grad.reshape(-1, leaf.shape[-1]))
    assert rel(summed, table) < 1e-12


def test_inputs_embeds_are_checked() -> None:
    model = make_model()
    embeds = torch.zeros(2, 5, 16, dtype=F64)
    x = ids(2, 5, seed=41)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(x, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(TypeError, match="inputs_embeds must be a floating-point tensor"):
        model(inputs_embeds=x)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, length, d_model=16\)"):
        model(inputs_embeds=embeds[..., :8])
    with pytest.raises(TypeError, match=r"inputs_embeds has dtype torch.float32 but the model's embeddings are "
                                        r"torch.float64"):
        model(inputs_embeds=embeds.float())
    with pytest.raises(ValueError, match=r"labels must have the \(batch, length\) of inputs_embeds \(2, 5\)"):
        model(inputs_embeds=embeds, labels=x[:, :4])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(embeds)  # embeddings passed as ids are refused, not read as embeddings
