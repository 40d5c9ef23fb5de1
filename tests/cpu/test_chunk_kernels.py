"""The per-chunk CPU kernels (``ops/cpu/csrc/chunk_kernels.cpp``) against float64 PyTorch."""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
from reference import reference_gammas, reference_retention

from yet_another_retnet.ops import _extension, chunk_kernels
from yet_another_retnet.ops.chunk_kernels import (
    chunk_contributions,
    chunk_contributions_reference,
    chunk_kernels_apply,
    chunk_output,
    chunk_output_reference,
    chunk_retention,
    chunk_retention_applies,
    chunk_retention_reference,
)
from yet_another_retnet.ops.retention import retention_chunkwise

SHAPES = [(1, 2, 3, 32, 32, 32), (2, 3, 2, 128, 64, 64), (1, 1, 2, 64, 32, 96)]


def kernels_available() -> bool:
    return _extension.load() and hasattr(torch.library, "register_autograd")


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest entry (sums of up to 128 float32 products)."""
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


def inputs(shape: tuple[int, ...], strided: bool) -> tuple[torch.Tensor, ...]:
    """q, k ``(b, h, n, c, dk)``, v ``(b, h, n, c, dv)`` needing gradients, a causal mask with random
    positive entries (every lower-triangle entry must reach the output), decay tables and states.
    ``strided``: q, k, v as transposed views of one projection, the layout the layer hands over."""
    batch, heads, chunks, c, dk, dv = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, strided)).encode()))
    if strided:
        proj = torch.randn(batch, chunks, c, heads, 2 * dk + dv, generator=gen)
        q, k, v = (t.permute(0, 3, 1, 2, 4).detach().requires_grad_() for t in proj.split([dk, dk, dv], -1))
    else:
        q, k = (torch.randn(batch, heads, chunks, c, dk, generator=gen, requires_grad=True) for _ in range(2))
        v = torch.randn(batch, heads, chunks, c, dv, generator=gen, requires_grad=True)
    mask = (torch.rand(heads, 1, c, c, generator=gen) + 0.5).tril()
    key_decay, query_decay = (torch.rand(heads, 1, c, 1, generator=gen) + 0.5 for _ in range(2))
    befores = torch.randn(batch, heads, chunks, dk, dv, generator=gen, requires_grad=True)
    return q, k, v, mask, key_decay, query_decay, befores


def check_against_float64(fn, ref, args: list[torch.Tensor], diff: list[int]) -> None:
    """``fn(*args)`` and its gradients in ``args[i]`` for ``i in diff`` against ``ref`` in float64."""
    out = fn(*args)
    args64 = [a.detach().double().requires_grad_(i in diff) for i, a in enumerate(args)]
    want = ref(*args64)
    assert max_err(out, want) < 1e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [args[i] for i in diff], grad)
    wanted = torch.autograd.grad(want, [args64[i] for i in diff], grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert g.shape == w.shape and max_err(g, w) < 1e-6


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_kernel_matches_float64(shape: tuple[int, ...], strided: bool) -> None:
    if not kernels_available():
        pytest.skip("kernels unavailable")
    q, k, v, mask, _, query_decay, befores = inputs(shape, strided)
    assert chunk_kernels_apply(q, v, mask, query_decay)
    assert chunk_output(q, k, v, mask, query_decay, befores).grad_fn.name().find("yaretnet") >= 0  # the kernel ran
    check_against_float64(chunk_output, chunk_output_reference, [q, k, v, mask, query_decay, befores], [0, 1, 2, 5])
    # Without a previous state: the inside of the chunks alone.
    check_against_float64(lambda *a: chunk_output(*a, None), lambda *a: chunk_output_reference(*a, None),
                          [q, k, v, mask, query_decay], [0, 1, 2])


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_contributions_kernel_matches_float64(shape: tuple[int, ...], strided: bool) -> None:
    if not kernels_available():
        pytest.skip("kernels unavailable")
    _, k, v, _, key_decay, _, _ = inputs(shape, strided)
    assert chunk_contributions(k, v, key_decay).grad_fn.name().find("yaretnet") >= 0  # the kernel ran
    check_against_float64(chunk_contributions, chunk_contributions_reference, [k, v, key_decay], [0, 1])


def test_falls_back_where_the_kernels_do_not_apply() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 3, 24, 16, generator=gen) for _ in range(3))  # chunk 24: not a multiple of 32
    mask = (torch.rand(2, 1, 24, 24, generator=gen)).tril()
    decay = torch.rand(2, 1, 24, 1, generator=gen)
    assert not chunk_kernels_apply(q, v, mask, decay)
    torch.testing.assert_close(chunk_output(q, k, v, mask, decay, None), chunk_output_reference(q, k, v, mask, decay, None))
    torch.testing.assert_close(chunk_contributions(k, v, decay), chunk_contributions_reference(k, v, decay))
    q64 = torch.randn(1, 1, 1, 32, 32, dtype=torch.float64, generator=gen)
    assert not chunk_kernels_apply(q64, q64, torch.ones(1, 1, 32, 32, dtype=torch.float64))
    q32 = q64.float()
    learned = torch.rand(1, 1, 32, 32, generator=gen).tril().requires_grad_()
    assert not chunk_kernels_apply(q32, q32, learned)  # a table that needs a gradient: the plain form
    chunk_output(q32, q32, q32, learned, torch.ones(1, 1, 32, 1), None).sum().backward()
    assert learned.grad is not None


def test_kernels_reject_bad_shapes() -> None:
    if not kernels_available():
        pytest.skip("kernels unavailable")
    q = torch.randn(1, 2, 1, 32, 32)
    qd = torch.ones(2, 1, 32, 1)
    with pytest.raises(RuntimeError, match=r"mask must be \(heads, 1, chunk, 32\)"):
        torch.ops.yaretnet.chunk_output(q, q, q, torch.ones(1, 1, 32, 32), qd, None)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        torch.ops.yaretnet.chunk_output(q[..., :16], q[..., :16], q[..., :16], torch.ones(2, 1, 32, 32), qd, None)
    with pytest.raises(RuntimeError, match=r"befores must be \(batch, heads, chunks, dk, dv\)"):
        torch.ops.yaretnet.chunk_output(q, q, q, torch.ones(2, 1, 32, 32), qd, torch.ones(1, 2, 1, 32, 16))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.yaretnet.chunk_contributions(q.double(), q.double(), qd.double())
    with pytest.raises(RuntimeError, match=r"key_decay must be \(heads, 1, chunk, 1\)"):
        torch.ops.yaretnet.chunk_contributions(q, q, torch.ones(2, 1, 16, 1))


def retention_tables(heads: int, c: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """mask, query_decay, key_decay as from :func:`inputs` and a ``(heads,)`` chunk decay in (0.5, 1)."""
    mask = (torch.rand(heads, 1, c, c, generator=gen) + 0.5).tril()
    query_decay, key_decay = (torch.rand(heads, 1, c, 1, generator=gen) + 0.5 for _ in range(2))
    return mask, query_decay, key_decay, torch.rand(heads, generator=gen) * 0.5 + 0.5


@pytest.mark.parametrize("with_final", [False, True])
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_retention_kernel_matches_float64(shape: tuple[int, ...], strided: bool, with_prev: bool,
                                          with_final: bool) -> None:
    # The fused op (both products and the scan between them) called directly, so it runs whatever
    # the thread count: outputs, final state and the gradients of q, k, v and the previous state
    # against the plain composition in float64, with and without a gradient on the final state.
    if not kernels_available():
        pytest.skip("kernels unavailable")
    q, k, v, *_ = inputs(shape, strided)
    batch, heads, _, c, dk, dv = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, strided, with_prev)).encode()))
    tables = retention_tables(heads, c, gen)
    prev = torch.randn(batch, heads, dk, dv, generator=gen, requires_grad=True) if with_prev else None
    out, final, _ = torch.ops.yaretnet.chunk_retention(q, k, v, *tables, prev, True)
    assert out.grad_fn.name().find("yaretnet") >= 0  # the kernel ran
    leaves = [q, k, v] + ([prev] if prev is not None else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want_out, want_final = chunk_retention_reference(*leaves64[:3], *(t.double() for t in tables),
                                                     leaves64[3] if with_prev else None)
    assert max_err(out, want_out) < 1e-6 and max_err(final, want_final) < 1e-6
    grad_out = torch.randn(out.shape, generator=gen)
    grad_final = torch.randn(final.shape, generator=gen) if with_final else None
    used = [(out, grad_out)] + ([(final, grad_final)] if grad_final is not None else [])
    got = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used])
    wanted = torch.autograd.grad([want_out] + ([want_final] if with_final else []), leaves64,
                                 [g.double() for _, g in used])
    for g, w in zip(got, wanted, strict=True):
        assert g.shape == w.shape and max_err(g, w) < 1e-6
    # Without a graph (inference) the op keeps no states for a backward: the same numbers.
    with torch.no_grad():
        plain_out, plain_final, befores = torch.ops.yaretnet.chunk_retention(q, k, v, *tables, prev, False)
    assert befores.numel() == 0
    assert torch.equal(plain_out, out.detach()) and torch.equal(plain_final, final.detach())


def test_retention_op_is_taken_where_the_work_spreads_over_the_threads() -> None:
    # Its only parallelism is over batch * heads: with 3 sequences on 2 threads one thread would
    # do twice the work, so the separate ops (parallel over chunks too) are taken there.
    if not kernels_available():
        pytest.skip("kernels unavailable")
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(5)
    tables = retention_tables(1, 32, gen)
    for groups in (1, 2, 3, 4, 6, 8, 9):
        q = torch.randn(groups, 1, 2, 32, 32, generator=gen)
        expect = groups % threads == 0 or groups >= 4 * threads
        assert chunk_retention_applies(q, q, *tables) == expect
        out, final = chunk_retention(q, q, q, *tables, None)  # kernel or reference: equal either way
        want_out, want_final = chunk_retention_reference(*(t.double() for t in (q, q, q, *tables)), None)
        assert max_err(out, want_out) < 1e-6 and max_err(final, want_final) < 1e-6


def test_the_package_and_a_training_step_do_not_import_dynamo() -> None:
    # The thread-count check above runs in every layer; under torch.compile it must be a constant,
    # and the decorator that made it one imported all of dynamo with the package (~70 MiB, ~0.9 s).
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from yet_another_retnet import RetNet, RetNetConfig\n"
            "model = RetNet(RetNetConfig(vocab_size=32, d_model=32, num_heads=2, num_layers=1, ffn_dim=64))\n"
            "x = torch.randint(0, 32, (2, 64))\n"
            "model(x, mode='chunkwise', chunk_size=32, labels=x).loss.backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout


def test_retention_op_double_backward_equals_float64() -> None:
    # Its backward is not differentiable itself: with create_graph=True it goes through the plain
    # composition's backward, recording a graph.
    if not kernels_available():
        pytest.skip("kernels unavailable")
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 3, 32, 32, generator=gen, requires_grad=True) for _ in range(3))
    prev = torch.randn(1, 2, 32, 32, generator=gen, requires_grad=True)
    tables = retention_tables(2, 32, gen)

    def second(fn, leaves: tuple[torch.Tensor, ...], tabs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out, final = fn(*leaves[:3], *tabs, leaves[3])
        firsts = torch.autograd.grad(out.square().sum() + final.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in firsts), leaves)

    def kernel(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, final, _ = torch.ops.yaretnet.chunk_retention(*args, True)
        return out, final

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = second(kernel, (q, k, v, prev), tables)
    ref = tuple(x.detach().double().requires_grad_() for x in (q, k, v, prev))
    want = second(chunk_retention_reference, ref, tuple(t.double() for t in tables))
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) < 1e-5


def test_retention_op_rejects_bad_shapes() -> None:
    if not kernels_available():
        pytest.skip("kernels unavailable")
    q = torch.randn(1, 2, 1, 32, 32)
    mask, qd, kd, decay = torch.ones(2, 1, 32, 32), torch.ones(2, 1, 32, 1), torch.ones(2, 1, 32, 1), torch.ones(2)
    op = torch.ops.yaretnet.chunk_retention
    with pytest.raises(RuntimeError, match=r"chunk_decay must be \(heads,\) = \(2\)"):
        op(q, q, q, mask, qd, kd, torch.ones(3), None, False)
    with pytest.raises(RuntimeError, match=r"prev must be \(batch, heads, dk, dv\)"):
        op(q, q, q, mask, qd, kd, decay, torch.ones(1, 2, 32, 16), False)
    with pytest.raises(RuntimeError, match=r"key_decay must be \(heads, 1, chunk, 1\)"):
        op(q, q, q, mask, qd, torch.ones(2, 1, 16, 1), decay, None, False)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        op(q, q, q, mask, qd, kd, decay.double(), None, False)
    with pytest.raises(RuntimeError, match="at least one chunk"):  # not a division by zero
        op(q[:, :, :0], q[:, :, :0], q[:, :, :0], mask, qd, kd, decay, None, False)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("length", [256, 64 * 5 + 17])
def test_chunkwise_through_the_kernels_equals_float64_retention(length: int, fused: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole chunkwise form with chunk 64 and head size 32 (the kernels' path on CPU float32),
    # a previous state, a length the chunk does not divide: outputs, state and gradients against
    # the independent float64 recurrence. Through the fused op (whatever the thread count) and
    # through the three separate ops.
    monkeypatch.setattr(chunk_kernels, "supports_chunk_retention", chunk_kernels.supports if fused else lambda *a: False)
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 4, length, 32, generator=gen, requires_grad=True) for _ in range(3))
    prev = torch.randn(2, 4, 32, 32, generator=gen)
    out, state = retention_chunkwise(q, k, v, prev, chunk_size=64)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want_out, want_state = reference_retention(*ref, reference_gammas(4), prev_state=prev.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), want_state, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum() + state.sum(), (q, k, v))
    wanted = torch.autograd.grad(want_out.sum() + want_state.sum(), ref)
    for g, w in zip(grads, wanted, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3)


def test_double_backward_through_the_kernels_equals_float64() -> None:
    # The kernels' and the scan's backwards are not kernels with their own backward: with
    # create_graph=True the chunk kernels take the plain form's backward and the scan's backward
    # is differentiated by the forward scan. Every first-order gradient (q, k, v and a previous
    # state: k and v reach the output directly and through the states) differentiated again,
    # against the float64 recurrence; no warning (torch only warns, then returns a wrong result,
    # when a backward cannot be differentiated).
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 96, 32, generator=gen, requires_grad=True) for _ in range(3))
    prev = torch.randn(1, 2, 32, 32, generator=gen, requires_grad=True)

    def second(out: torch.Tensor, state: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        firsts = torch.autograd.grad(out.square().sum() + state.square().sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in firsts), inputs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = second(*retention_chunkwise(q, k, v, prev, chunk_size=32), (q, k, v, prev))
    ref = tuple(x.detach().double().requires_grad_() for x in (q, k, v, prev))
    want = second(*reference_retention(*ref[:3], reference_gammas(2), prev_state=ref[3]), ref)
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) < 1e-5
