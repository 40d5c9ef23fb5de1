"""Our Triton kernels (``ops/triton/``) under Triton's interpreter on CPU, against the float64
reference loop (tests/reference.py).

The interpreter runs the very kernels a GPU compiles, in NumPy: fp32 and fp16 work, bf16 does not
(NumPy has no bfloat16), so bf16 is checked by the CUDA tests (tests/ops/triton/test_triton_cuda.py). The
shapes are tiny and odd on purpose: lengths that are no multiple of the chunk, ``dk != dv``, value
dims wider than one value block, chunks under 16 rows (the kernels pad a chunk to the 16 rows
``tl.dot`` wants) and over :data:`MAX_CHUNK` (run in chunks of that size).

Tolerances (relative Frobenius error against float64): 2e-3 for float32 inputs, 5e-3 for float16.
The interpreter computes in exact float32 (~1e-7 here), but on a GPU the kernels' float32
products run in TF32 (10-bit mantissa, unit roundoff 2^-11 ~ 4.9e-4): one product lands near
3e-4, and a state that went through a product before being multiplied again near 1e-3. The same
tests run on CUDA with these bounds, so they must hold there too; every bug seen while writing
the kernels (a wrong decay power, a missing mask, a transposed product) gave errors of 1e-1 or more.
For float16 the output is rounded to float16 (~2.4e-4 more) and compared with the reference on the
rounded inputs.
"""

from __future__ import annotations

import re

import pytest
import torch
from reference import F64, reference_gammas, reference_retention, rel_err

from yet_another_retnet.ops import backends, retention_chunkwise, retention_recurrent
from yet_another_retnet.ops.decay import resolve_log_decay
from yet_another_retnet.ops.triton import (
    chunk_retention_triton,
    interpreter_problem,
    supports,
    supports_step,
    triton_problem,
)
from yet_another_retnet.ops.triton.chunkwise import SCHEDULE_ENV, SCHEDULES

pytestmark = pytest.mark.skipif(triton_problem() is not None, reason=str(triton_problem()))

TOL = {torch.float32: 2e-3, torch.float16: 5e-3}


@pytest.fixture
def interpret(monkeypatch):
    """CPU tensors may take the kernels (Triton's interpreter), where this Triton's interpreter runs
    under this NumPy (a skip naming the versions otherwise: the GPU machine's image pairs Triton 3.6
    with a NumPy it cannot run under)."""
    if interpreter_problem() is not None:
        pytest.skip(interpreter_problem())
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    """Each chunkwise test runs both schedules of the kernels, chosen as users choose them."""
    monkeypatch.setenv(SCHEDULE_ENV, request.param)
    return request.param


def make(batch, heads, length, dk, dv, dtype=torch.float32, seed=0, state=True, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, length, dk, generator=gen, dtype=F64).to(dtype) for _ in range(2))
    v = torch.randn(batch, heads, length, dv, generator=gen, dtype=F64).to(dtype)
    s0 = torch.randn(batch, heads, dk, dv, generator=gen, dtype=F64).float() if state else None
    for t in (q, k, v, s0):
        if t is not None:
            t.requires_grad_(grad)
    return q, k, v, s0


def gammas_for(kind, heads):
    """The decay argument and the gammas the reference uses."""
    if kind == "custom":  # includes gamma = 1 (no decay) and a fast decay
        g = torch.tensor([1.0, 0.5, 0.97, 0.999][:heads], dtype=F64)
        return g, g
    return kind, reference_gammas(heads, kind)


# (batch, heads, length, dk, dv, chunk, decay, with state)
CASES = [
    (1, 2, 37, 16, 24, 8, "eq8", True),          # 4 whole chunks + 5 rows
    (2, 3, 20, 8, 80, 7, "log-spaced", False),   # dv over two value blocks, chunk 7
    (1, 4, 45, 32, 16, 100, "custom", True),     # chunk over MAX_CHUNK, one chunk
    (1, 1, 5, 4, 4, None, "eq8", True),          # whole input as one chunk, tiny dims
    (1, 2, 70, 16, 16, 64, "custom", False),     # a whole chunk of 64 + 6 rows
    (1, 2, 21, 80, 24, 8, "eq8", True),          # dk over two key blocks of the backward, the last partial
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}-dk{c[3]}-dv{c[4]}-c{c[5]}-{c[6]}")
def test_forward_and_state_match_reference(interpret, schedule, case):
    batch, heads, length, dk, dv, chunk, kind, with_state = case
    decay, gammas = gammas_for(kind, heads)
    q, k, v, s0 = make(batch, heads, length, dk, dv, state=with_state)
    out, state = retention_chunkwise(q, k, v, s0, chunk, decay=decay, backend="triton")
    ref_out, ref_state = reference_retention(q, k, v, gammas, prev_state=s0)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert rel_err(state, ref_state) < TOL[torch.float32]


def _grads(out, state, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=gen, dtype=F64)
    d_state = torch.randn(state.shape, generator=gen, dtype=F64)
    loss = (out.to(F64) * d_out).sum() + (state.to(F64) * d_state).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[5]],
                         ids=["eq8-state", "log-spaced-2vblocks", "custom-bigchunk", "2kblocks"])
def test_gradients_match_reference(interpret, schedule, case):
    """Gradients w.r.t. q, k, v and the initial state, through the output and the final state."""
    batch, heads, length, dk, dv, chunk, kind, with_state = case
    decay, gammas = gammas_for(kind, heads)
    q, k, v, s0 = make(batch, heads, length, dk, dv, state=with_state, grad=True)
    inputs = [t for t in (q, k, v, s0) if t is not None]
    got = _grads(*retention_chunkwise(q, k, v, s0, chunk, decay=decay, backend="triton"), inputs)
    want = _grads(*reference_retention(q, k, v, gammas, prev_state=s0), inputs)
    for name, g, w in zip(["q", "k", "v", "s0"], got, want, strict=False):
        assert g.dtype == (torch.float32), name
        assert rel_err(g, w) < TOL[torch.float32], name


def test_state_hand_off_equals_one_call(interpret, schedule):
    """Two calls, the state handed on (mid-chunk split), equal one call: values and gradients."""
    q, k, v, s0 = make(1, 2, 29, 16, 16, grad=True)
    out, state = retention_chunkwise(q, k, v, s0, 8, backend="triton")
    out_a, mid = retention_chunkwise(q[:, :, :13], k[:, :, :13], v[:, :, :13], s0, 8, backend="triton")
    out_b, end = retention_chunkwise(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], mid, 8, backend="triton")
    assert rel_err(torch.cat([out_a, out_b], dim=2), out) < 1e-5
    assert rel_err(end, state) < 1e-5
    inputs = [q, k, v, s0]
    one = _grads(out, state, inputs)
    two = _grads(torch.cat([out_a, out_b], dim=2), end, inputs)
    for g1, g2 in zip(one, two, strict=True):
        assert rel_err(g2, g1) < 1e-5


def test_float16_inputs(interpret, schedule):
    """fp16 in, fp16 out, float32 state, float32 accumulation; gradients in fp16."""
    q, k, v, s0 = make(2, 2, 33, 16, 32, dtype=torch.float16, grad=True)
    out, state = retention_chunkwise(q, k, v, s0, 16, backend="triton")
    assert out.dtype == torch.float16 and state.dtype == torch.float32
    gammas = reference_gammas(2)
    ref_out, ref_state = reference_retention(q, k, v, gammas, prev_state=s0)
    assert rel_err(out, ref_out) < TOL[torch.float16]
    assert rel_err(state, ref_state) < TOL[torch.float16]
    inputs = [q, k, v, s0]
    got = _grads(out, state, inputs)
    want = _grads(ref_out, ref_state, inputs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype or g.dtype == torch.float16
        assert rel_err(g, w) < TOL[torch.float16]


def test_direct_launcher_agrees_with_public_api(interpret, schedule):
    """The launcher the dispatch calls, given log(gamma) from ops/decay.py, and the public API
    on the plain PyTorch form: the same function."""
    q, k, v, s0 = make(1, 3, 26, 8, 12)
    log_gamma = resolve_log_decay("log-spaced", 3, q.device)
    out, state = chunk_retention_triton(q, k, v, s0, 5, log_gamma, 0.3)
    ref_out, ref_state = retention_chunkwise(q, k, v, s0, 5, decay="log-spaced", scale=0.3, backend="torch")
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert rel_err(state, ref_state) < TOL[torch.float32]


@pytest.mark.parametrize("shape", [(2, 3, 70, 80, 24, 64), (1, 2, 130, 16, 72, 100), (1, 1, 9, 4, 4, None)],
                         ids=lambda s: "x".join(map(str, s)))
def test_split_and_fused_schedules_agree(interpret, shape):
    """The two schedules compute one function: outputs, states and every gradient agree to float32
    rounding (the split schedule runs 64-row chunks at any key dim, the fused one 32 over dk 64)."""
    batch, heads, length, dk, dv, chunk = shape
    q, k, v, s0 = make(batch, heads, length, dk, dv, grad=True, seed=3)
    log_gamma = resolve_log_decay("log-spaced", heads, q.device)
    results = {}
    for name in SCHEDULES:
        out, state = chunk_retention_triton(q, k, v, s0, chunk, log_gamma, dk**-0.5, schedule=name)
        results[name] = (out, state, *_grads(out, state, [q, k, v, s0]))
    for a, b in zip(results["split"], results["fused"], strict=True):
        assert rel_err(a, b) < 1e-5


def test_split_prefill_in_pieces_equals_one_call(interpret, monkeypatch):
    """Without gradients a long split call runs in pieces of whole chunks (h bounded): the same
    outputs and state as one call, to float32 rounding, whatever the piece."""
    from yet_another_retnet.ops.triton import chunkwise

    q, k, v, s0 = make(1, 2, 77, 16, 24, seed=5)
    log_gamma = resolve_log_decay("eq8", 2, q.device)
    with torch.no_grad():
        whole = chunk_retention_triton(q, k, v, s0, 8, log_gamma, 0.25, schedule="split")
        per_chunk = 1 * 2 * 16 * 24 * q.element_size()
        for chunks in (1, 3):
            monkeypatch.setattr(chunkwise, "SPLIT_STATES_BUDGET", chunks * per_chunk)
            assert chunkwise._split_piece(q, v, 8) == chunks * 8
            pieces = chunk_retention_triton(q, k, v, s0, 8, log_gamma, 0.25, schedule="split")
            assert rel_err(pieces[0], whole[0]) < 1e-6 and rel_err(pieces[1], whole[1]) < 1e-6
    ref_out, ref_state = reference_retention(q, k, v, reference_gammas(2), prev_state=s0, scale=0.25)
    assert rel_err(pieces[0], ref_out) < TOL[torch.float32] and rel_err(pieces[1], ref_state) < TOL[torch.float32]


def test_torch_compile_runs_the_kernels_as_a_graph_break(interpret, schedule):
    """Under torch.compile the kernels run eagerly between compiled pieces (tracing into the
    launchers fails: under the interpreter dynamo would trace NumPy): the same values and gradients."""
    q, k, v, s0 = make(1, 2, 40, 16, 16, grad=True, seed=6)
    log_gamma = resolve_log_decay("eq8", 2, q.device)

    def loss(q, k, v, s0):
        out, state = chunk_retention_triton(q, k, v, s0, 8, log_gamma, 0.25)
        return (out * 2).sum() + state.square().sum()

    torch._dynamo.reset()
    got = torch.compile(loss, backend="eager")(q, k, v, s0)
    got_grads = torch.autograd.grad(got, [q, k, v, s0])
    want = loss(q, k, v, s0)
    want_grads = torch.autograd.grad(want, [q, k, v, s0])
    assert rel_err(got, want) < 1e-6
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel_err(g, w) < 1e-6
    with torch.no_grad():
        step = torch.compile(lambda q, k, v, s: retention_recurrent(q, k, v, s, backend="triton"), backend="eager")
        out, state = step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0)
        ref_out, ref_state = retention_recurrent(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, backend="torch")
    assert rel_err(out, ref_out) < 1e-5 and rel_err(state, ref_state) < 1e-5


@pytest.mark.parametrize("versions, refusal", [
    ({"triton": "3.6.0", "numpy": "2.4.6"}, "Triton 3.6's interpreter fails under NumPy 2.4"),
    ({"triton": "3.1.0", "numpy": "1.26.4"}, "Triton 3.1 is older than 3.2"),
    ({"triton": "3.6.0", "numpy": "2.3.5"}, None),
    ({"triton": "3.7.0", "numpy": "2.4.6"}, None),
    ({"triton": "3.10.1", "numpy": "2.5.2"}, None),
])
def test_a_triton_that_cannot_run_the_kernels_is_refused_by_name(monkeypatch, versions, refusal):
    """Triton < 3.2 (PyTorch < 2.6's CUDA wheels) cannot run the kernels at all, and Triton < 3.7
    under NumPy >= 2.4 (the GPU machine's image) fails inside every interpreted kernel with a loop:
    such calls are not routed to the kernels, and a demand for them says why."""
    import importlib.metadata

    from yet_another_retnet.ops import triton as our_triton

    def clear():
        our_triton.triton_problem.cache_clear()
        our_triton.interpreter_problem.cache_clear()

    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    clear()
    try:
        q, k, v, s0 = make(1, 2, 9, 8, 8)
        ok = supports(q, k, v, s0)
        assert ok == supports_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0) == (refusal is None)
        if refusal is not None:
            with pytest.raises(ValueError, match="backend='triton'.*" + re.escape(refusal)):
                retention_chunkwise(q, k, v, s0, 4, backend="triton")
    finally:
        monkeypatch.undo()
        clear()


def test_schedule_choice_errors_name_the_setting(interpret, monkeypatch):
    q, k, v, s0 = make(1, 2, 9, 8, 8)
    log_gamma = resolve_log_decay("eq8", 2, q.device)
    with pytest.raises(ValueError, match="schedule must be one of"):
        chunk_retention_triton(q, k, v, s0, 4, log_gamma, 0.3, schedule="fast")
    monkeypatch.setenv(SCHEDULE_ENV, "Fused ")
    fused = chunk_retention_triton(q, k, v, s0, 4, log_gamma, 0.3)
    assert rel_err(fused[0], chunk_retention_triton(q, k, v, s0, 4, log_gamma, 0.3, schedule="split")[0]) < 1e-5
    monkeypatch.setenv(SCHEDULE_ENV, "parallel")
    with pytest.raises(ValueError, match=SCHEDULE_ENV):
        retention_chunkwise(q, k, v, s0, 4, backend="triton")


# ------------------------------------------------------------------------------------------
# The decoding step
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_kernel_matches_recurrent_form(interpret, dtype):
    """Steps through the Triton kernel equal the PyTorch recurrent form and the reference."""
    q, k, v, s0 = make(2, 3, 6, 16, 40, dtype=dtype)
    decay, gammas = gammas_for("custom", 3)
    state_t = state_p = s0  # from a given state
    outs = []
    with torch.no_grad():
        for t in range(q.shape[2]):
            o_t, state_t = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], state_t, decay=decay,
                                               backend="triton")
            o_p, state_p = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], state_p, decay=decay,
                                               backend="torch")
            assert o_t.dtype == dtype and state_t.dtype == torch.float32
            assert rel_err(o_t, o_p) < TOL[dtype] and rel_err(state_t, state_p) < 1e-6
            outs.append(o_t)
    ref_out, ref_state = reference_retention(q, k, v, gammas, prev_state=s0)
    assert rel_err(torch.stack(outs, dim=2), ref_out) < TOL[dtype]
    assert rel_err(state_t, ref_state) < TOL[dtype]


def test_step_kernel_continues_a_chunkwise_prefill(interpret, schedule):
    """A prefill through the chunkwise kernel, then steps through the step kernel: the reference."""
    q, k, v, _ = make(1, 2, 20, 16, 16, state=False)
    with torch.no_grad():
        out, state = retention_chunkwise(q[:, :, :15], k[:, :, :15], v[:, :, :15], None, 4, backend="triton")
        outs = [out]
        for t in range(15, 20):
            o_t, state = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], state, backend="triton")
            outs.append(o_t.unsqueeze(2))
    ref_out, ref_state = reference_retention(q, k, v, reference_gammas(2))
    assert rel_err(torch.cat(outs, dim=2), ref_out) < TOL[torch.float32]
    assert rel_err(state, ref_state) < TOL[torch.float32]


# ------------------------------------------------------------------------------------------
# Selection (ops/backends.py): what runs where, and clear errors
# ------------------------------------------------------------------------------------------


def test_cpu_tensors_take_pytorch_form_by_default(interpret, monkeypatch):
    """Without ``backend``, CPU tensors never take the kernels, even under the interpreter."""
    import yet_another_retnet.ops.retention as retention_module

    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernels were chosen for a CPU call")

    monkeypatch.setattr(retention_module, "chunk_retention_triton", boom)
    monkeypatch.setattr(retention_module, "retention_step_triton", boom)
    q, k, v, s0 = make(1, 2, 9, 8, 8)
    out, _ = retention_chunkwise(q, k, v, s0, 4)
    retention_recurrent(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0)
    assert rel_err(out, reference_retention(q, k, v, reference_gammas(2), prev_state=s0)[0]) < 1e-5


def test_explicit_backends_fail_clearly_where_they_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, s0 = make(1, 2, 9, 8, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        retention_chunkwise(q, k, v, s0, 4, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        retention_recurrent(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, backend="triton")
    with pytest.raises(ValueError, match=r"fla.*CUDA"):
        retention_chunkwise(q, k, v, s0, 4, backend="fla")
    with pytest.raises(ValueError, match="backend must be"):
        retention_chunkwise(q, k, v, s0, 4, backend="cuda")
    with pytest.raises(ValueError, match="chunkwise calls"):
        retention_recurrent(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, backend="fla")


def test_supports_predicates(interpret):
    q, k, v, s0 = make(1, 2, 9, 8, 8)
    assert supports(q, k, v, s0) and supports(q.half(), k.half(), v.half(), s0)
    assert not supports(q.double(), k.double(), v.double(), s0)          # float64: PyTorch form
    assert not supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), s0)    # no bf16 in the interpreter
    wide = torch.zeros(1, 1, 3, 512)
    assert not supports(wide, wide, wide)                                 # dk over MAX_KEY_DIM
    assert not supports(q[:, :, :0], k[:, :, :0], v[:, :, :0])            # empty input
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0])
    assert supports_step(*step, s0)
    assert not supports_step(step[0].requires_grad_(), *step[1:], s0)     # the step has no backward
    with torch.no_grad():
        assert supports_step(*step, s0)


def test_backend_switch_and_fla_selection(monkeypatch):
    """``YARETNET_CUDA_RETENTION`` and fla's selection rules (fla itself needs a GPU)."""
    monkeypatch.setenv(backends.ENV, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV):
        backends.default_cuda_backend()
    for value in ("auto", "triton", "torch", "fla"):
        monkeypatch.setenv(backends.ENV, value.upper())
        assert backends.default_cuda_backend() == value
    assert backends.is_eq8(resolve_log_decay("eq8", 8, torch.device("cpu")))
    assert not backends.is_eq8(resolve_log_decay("log-spaced", 8, torch.device("cpu")))
    eq8 = resolve_log_decay("eq8", 4, torch.device("cpu"))
    assert backends.fla_problem("cuda", torch.bfloat16, eq8, installed=True) is None
    assert "Eq. 8" in backends.fla_problem("cuda", torch.bfloat16, eq8.flip(0), installed=True)
    assert "CUDA" in backends.fla_problem("cpu", torch.float32, eq8, installed=True)
    assert "float64" in backends.fla_problem("cuda", torch.float64, eq8, installed=True)
    assert "not installed" in backends.fla_problem("cuda", torch.float16, eq8, installed=False)


@pytest.mark.parametrize("rms_norm", [False, True])
def test_model_decoding_step_with_triton_core(rms_norm):
    """The decoding step's core (memory update and q S') through the step kernel equals the plain
    step: rotation, key scale, group or RMS norm and gate around it unchanged."""
    from yet_another_retnet.ops.decode_step import retention_step_reference

    batch, heads, dk, dv = 3, 2, 16, 24
    gen = torch.Generator().manual_seed(4)
    proj = torch.randn(batch, 2 * heads * dk + 2 * heads * dv, generator=gen)
    memory = torch.randn(batch, heads, dk, dv, generator=gen)
    angles = torch.randn(batch, 2, 1, dk // 2, generator=gen)
    rotation = torch.polar(torch.ones_like(angles), angles) * torch.tensor([1.0, dk**-0.5]).view(1, 2, 1, 1)
    gamma = torch.tensor([0.9, 0.99]).view(-1, 1, 1)
    weight = None if rms_norm else torch.randn(heads * dv, generator=gen)
    bias = None if rms_norm else torch.randn(heads * dv, generator=gen)
    with torch.no_grad():
        for rot in (rotation, None):
            args = (proj, memory, rot, gamma, weight, bias, 1e-5, rms_norm, torch.nn.functional.silu)
            want_y, want_m = retention_step_reference(*args)
            got_y, got_m = retention_step_reference(*args, triton_core=True)
            assert rel_err(got_y, want_y) < TOL[torch.float32] and rel_err(got_m, want_m) < 1e-6
            # In place: the kernel writes the new memory over the old one and returns that tensor.
            over = memory.clone()
            in_y, in_m = retention_step_reference(proj, over, *args[2:], triton_core=True, in_place=True)
            assert in_m is over and torch.equal(in_m, got_m) and torch.equal(in_y, got_y)
    from yet_another_retnet.ops.triton.decode import step_with_gamma

    q1 = torch.randn(batch, heads, dk)
    with pytest.raises(ValueError, match="out_state"):
        step_with_gamma(q1, q1, torch.randn(batch, heads, dv), memory, gamma.reshape(-1), 1.0, memory.double())


def test_kernels_use_only_triton_builtins():
    """Triton's own ``@triton.jit`` helpers (``tl.zeros``, ``tl.sum``, ``tl.cdiv``...) are bound to
    the mode Triton was first imported in, so a kernel using one fails under the interpreter in a
    process that imported Triton compiled (seen: after transformers had imported it)."""
    import re
    from pathlib import Path

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    import yet_another_retnet.ops.triton as package

    folder = Path(package.__file__).parent
    for path in sorted(folder.glob("*_kernels.py")):
        names = set(re.findall(r"\btl\.(\w+)\(", path.read_text()))
        assert names, path
        helpers = sorted(n for n in names if isinstance(getattr(tl, n, None), JITFunction))
        assert not helpers, (path.name, helpers)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The real compiler (stricter than the interpreter: types, layouts, resources) takes the
    kernels as the launchers configure them, down to sm_90 machine code with Triton's bundled
    ptxas, within an H100 block's shared memory. A tiny configuration here; every dtype and head
    dim: ``python -m yet_another_retnet.ops.triton.compile_check``."""
    from yet_another_retnet.ops.triton import compile_check

    try:
        usage = compile_check.compile_chunkwise(torch.float16, 16, 32)
        usage.update(compile_check.compile_split(torch.float16, 16, 32))
        usage["step"] = compile_check.compile_step(torch.float16, 16, 32)
    except (RuntimeError, FileNotFoundError) as exc:  # a Triton build without the CUDA toolchain
        if "ptxas" in str(exc) or isinstance(exc, FileNotFoundError):
            pytest.skip(f"Triton cannot compile for CUDA here: {exc}")
        raise
    assert set(usage) == {"forward", "backward dq", "backward dk dv", "split states", "split out",
                          "split state grads", "split dq dk", "split dv", "step"}
    for name, u in usage.items():
        assert 0 <= u.shared <= compile_check.SHARED_LIMIT, name
