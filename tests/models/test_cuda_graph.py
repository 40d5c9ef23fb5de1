"""The graphed decoder (models/cuda_graph.py): its buffers, rotation table and copies checked
eagerly on CPU against the model's own steps; the captured graph against them on CUDA (skipped
without a GPU); and its errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import rel_err

import yet_another_retnet.models.cuda_graph as cuda_graph
from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.models.cuda_graph import GraphedDecoder

VOCAB = 37
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_model(dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": VOCAB, "d_model": 32, "num_heads": 2, "num_layers": 3,
                              "ffn_dim": 48, "dropout": 0.0, "chunk_size": 4, "tie_embeddings": False}
    fields.update(overrides)
    torch.manual_seed(0)
    model = RetNet(RetNetConfig(**fields)).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # clear winners for argmax comparisons (the default std makes near ties)
        model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    return model


def _steps_both_ways(model: RetNet, capture: bool, batch: int = 2, prompt: int = 9, steps: int = 6):
    """Logits and final states of ``steps`` greedy steps: the model's own ``step_`` and the graphed
    decoder, from one prefill (rows of different lengths: one left-padded)."""
    device = model.lm_head.weight.device
    ids = torch.randint(0, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    start = model.prefill(ids, attention_mask=mask)
    state = start.state
    graphed = GraphedDecoder(model, state, max_position=prompt + steps, capture=capture)
    token = start.logits[:, -1].argmax(-1)
    want, got = [], []
    for _ in range(steps):
        want.append(model.step_(token, state).clone())
        got.append(graphed.step(token).clone())
        token = want[-1].argmax(-1)
    return torch.stack(want), torch.stack(got), state, graphed.state()


@pytest.mark.parametrize("overrides", [{}, {"relative_position": False}], ids=["xpos", "no-rotation"])
def test_eager_body_equals_the_models_steps(overrides):
    model = make_model(**overrides)
    want, got, state, graphed_state = _steps_both_ways(model, capture=False)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(graphed_state.position, state.position)
    for a, b in zip(graphed_state.memories, state.memories, strict=True):
        assert rel_err(a, b) < 1e-5


def test_positions_past_the_table_compute_their_rotation(monkeypatch):
    """Past the largest table, the step computes the rotation of its positions instead."""
    monkeypatch.setattr(cuda_graph, "_MAX_TABLE", 8)
    want, got, _, _ = _steps_both_ways(make_model(), capture=False)
    assert rel_err(got, want) < 1e-5


def test_the_callers_state_is_left_alone_and_errors_name_the_argument():
    model = make_model()
    state = model.prefill(torch.randint(0, VOCAB, (2, 5))).state
    before = [m.clone() for m in state.memories], state.position.clone()
    graphed = GraphedDecoder(model, state, max_position=6, capture=False)
    graphed.step(torch.tensor([1, 2]))
    assert torch.equal(state.position, before[1])
    assert all(torch.equal(a, b) for a, b in zip(state.memories, before[0], strict=True))
    graphed.step(torch.tensor([1, 2]))  # writes position 6, the last allowed
    with pytest.raises(ValueError, match="max_position"):
        graphed.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ids must be"):
        graphed.step(torch.tensor([1]))
    with pytest.raises(TypeError, match="integer"):
        graphed.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 37\)"):
        graphed.step(torch.tensor([1, VOCAB]))
    with pytest.raises(ValueError, match="max_position"):
        GraphedDecoder(model, state, max_position=4, capture=False)
    with pytest.raises(ValueError, match="capture"):
        GraphedDecoder(model, state, max_position=9, capture=True)
    with pytest.raises(ValueError, match="eval-mode"):
        GraphedDecoder(model.train(), state, max_position=9, capture=False)
    model.eval()
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, cuda_graph=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_replays_equal_the_models_steps_on_cuda(dtype):
    model = make_model(dtype=dtype, device="cuda")
    want, got, state, graphed_state = _steps_both_ways(model, capture=True)
    assert rel_err(got.float(), want.float()) < 1e-5
    assert torch.equal(graphed_state.position, state.position)
    for a, b in zip(graphed_state.memories, state.memories, strict=True):
        assert rel_err(a, b) < 1e-5


@needs_cuda
def test_generate_with_a_cuda_graph_gives_the_same_tokens():
    model = make_model(device="cuda")
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2)).cuda()
    assert torch.equal(model.generate(ids, max_new_tokens=10, cuda_graph=True), model.generate(ids, max_new_tokens=10))
