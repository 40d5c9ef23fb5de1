"""fla's ``chunk_retention`` behind our API, checked on CPU with a stand-in for fla's module: the
layout and state-scale conversions, and that ``torch.compile`` runs the call eagerly (a graph break)
rather than tracing into fla. fla's real kernels need CUDA; ``tests/ops/triton/test_triton_cuda.py``
compares them with the float64 reference where a GPU is present."""

from __future__ import annotations

import sys
import types

import torch
from reference import reference_gammas, reference_retention, rel_err

from yet_another_retnet.ops import retention_chunkwise
from yet_another_retnet.ops.fla_backend import chunk_retention_fla


def _is_compiling() -> bool:
    compiler_check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(compiler_check() if compiler_check is not None else torch._dynamo.is_compiling())


def _fake_fla(monkeypatch, seen: list[bool]) -> None:
    """Install ``fla.ops.retention.chunk_retention`` as fla documents it: ``(b, L, h, d)`` inputs,
    ``o = scale * q S`` with a state that holds no scale, computed here by our torch form."""

    def chunk_retention(q, k, v, scale, initial_state, output_final_state):
        seen.append(_is_compiling())
        assert output_final_state
        prev = None if initial_state is None else initial_state * scale
        out, state = retention_chunkwise(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prev, 8,
                                         scale=scale, backend="torch")
        return out.transpose(1, 2), state / scale

    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    ret = types.ModuleType("fla.ops.retention")
    ret.chunk_retention = chunk_retention  # type: ignore[attr-defined]
    fla.ops = ops  # type: ignore[attr-defined]
    ops.retention = ret  # type: ignore[attr-defined]
    for name, module in (("fla", fla), ("fla.ops", ops), ("fla.ops.retention", ret)):
        monkeypatch.setitem(sys.modules, name, module)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, 19, 8, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 19, 12, generator=g)
    s0 = torch.randn(2, 2, 8, 12, generator=g)
    return q, k, v, s0


def test_fla_call_converts_layout_and_state_scale(monkeypatch):
    seen: list[bool] = []
    _fake_fla(monkeypatch, seen)
    q, k, v, s0 = _inputs()
    out, state = chunk_retention_fla(q, k, v, s0, 0.3)
    want_out, want_state = reference_retention(q, k, v, reference_gammas(2), prev_state=s0, scale=0.3)
    assert out.shape == v.shape and state.dtype == torch.float32
    assert rel_err(out, want_out) < 1e-5 and rel_err(state, want_state) < 1e-5
    assert seen == [False]


def test_torch_compile_runs_fla_eagerly_as_a_graph_break(monkeypatch):
    """Without the graph break dynamo traces into fla's Python (there: autotuners, launch code);
    the stand-in sees ``is_compiling()`` True then."""
    seen: list[bool] = []
    _fake_fla(monkeypatch, seen)
    q, k, v, s0 = _inputs(1)

    def loss(q, k, v, s0):
        out, state = chunk_retention_fla(q, k, v, s0, 0.3)
        return (out * 2).sum() + state.square().sum()

    torch._dynamo.reset()
    got = torch.compile(loss, backend="eager")(q, k, v, s0)
    assert seen == [False]
    assert rel_err(got, loss(q, k, v, s0)) < 1e-6
