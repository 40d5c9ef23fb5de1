"""States a caller gets wrong, or holds on to: each misuse is an error naming the state, or a
result that does not depend on it; never a silent wrong answer."""

from __future__ import annotations

import warnings

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig, RetNetState


def _model(dtype: torch.dtype = torch.float32, **overrides: object) -> RetNet:
    torch.manual_seed(0)
    fields: dict[str, object] = {"vocab_size": 37, "d_model": 32, "num_heads": 2, "num_layers": 2, "ffn_dim": 48,
                                 "dropout": 0.0, "chunk_size": 4}
    fields.update(overrides)
    return RetNet(RetNetConfig(**fields)).to(dtype).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent", "parallel"])
def test_an_empty_call_returns_a_state_of_its_own(mode: str) -> None:
    # Stepping the state an empty call returned in place must leave the caller's state as it was.
    model = _model()
    ids = torch.randint(0, 37, (2, 6))
    with torch.no_grad():
        state = model(ids[:, :5], mode="chunkwise").state
        kept = [m.clone() for m in state.memories]
        same = model(ids[:, :0], state=state, mode=mode).state
        assert all(torch.equal(a, b) for a, b in zip(same.memories, kept, strict=True))
        model.step_(ids[:, 5], same)
    assert all(torch.equal(a, b) for a, b in zip(state.memories, kept, strict=True))
    assert state.position.tolist() == [5, 5]


def test_step_in_place_checks_the_state_by_name() -> None:
    model = _model()
    ids = torch.tensor([1, 2])
    state = model.empty_state(2)
    negative = RetNetState([m.clone() for m in state.memories], torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"state\.position must be >= 0"):
        model.step_(ids, negative)
    other = _model(num_heads=4).empty_state(2)  # another head layout
    with pytest.raises(ValueError, match=r"state\.memories\[0\] must have shape"):
        model.step_(ids, other)
    narrow = RetNetState([m.to(torch.bfloat16) for m in state.memories], state.position.clone())
    with pytest.raises(TypeError, match=r"state\.memories\[0\] must be torch\.float32"):
        model.step_(ids, narrow)
    assert all(m.dtype == torch.bfloat16 for m in narrow.memories)  # refused before anything changed
    model.step_(ids, state)  # the model's own state is fine
    assert state.position.tolist() == [1, 1]


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_a_state_of_another_dtype_is_refused_in_every_form(mode: str) -> None:
    # A float64 state on a float32 model came back float64 from one form and float32 from others.
    model = _model()
    wide = RetNetState([m.double() for m in model.empty_state(1).memories], torch.tensor([0]))
    with pytest.raises(TypeError, match=r"state\.memories\[0\] must be torch\.float32"):
        model(torch.tensor([[1, 2]]), state=wide, mode=mode)


def test_an_empty_batch_steps_under_no_grad() -> None:
    model = _model()
    with torch.no_grad():
        out = model(torch.zeros(0, 1, dtype=torch.long))
    assert out.logits.shape == (0, 1, 37)


def test_generating_in_training_mode_warns() -> None:
    model = _model(dropout=0.1).train()
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match="training mode"):
        model.generate(prompt, 2)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt, 2)
