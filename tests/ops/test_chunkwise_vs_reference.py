"""The fast training paths against their plain references (and an independent float64 loop).

- ``retention_chunkwise`` (cached decay tables, no Python loop over chunks) against
  ``retention_chunkwise_reference`` (powers per call, a loop over chunks) and against the
  token-by-token recurrence of ``tests/reference.py``: outputs, states and gradients.
- The cached tables against the uncached ``decay_mask`` / ``decay_powers``, and their safety:
  tables first built under ``inference_mode`` must still work in a later backward pass.
- ``MultiScaleRetention``'s fused multi-token path (one q/k/v/g matmul, complex rotation)
  against its plain path (``fast_path = False``), with padding, earlier states and gradients.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from reference import reference_gammas, reference_retention

from yet_another_retnet.layers.retention import MultiScaleRetention
from yet_another_retnet.ops.decay import (
    ChunkTables,
    chunk_tables,
    decay_mask,
    decay_powers,
    scaled_decay_mask,
)
from yet_another_retnet.ops.retention import (
    retention_chunkwise,
    retention_chunkwise_reference,
    retention_parallel,
)

F64 = torch.float64


def _inputs(seed: int, batch: int, heads: int, length: int, dk: int, dv: int, dtype: torch.dtype = F64,
            with_state: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dk, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(batch, heads, length, dk, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(batch, heads, length, dv, generator=gen, dtype=F64).to(dtype)
    state = torch.randn(batch, heads, dk, dv, generator=gen, dtype=F64) if with_state else None
    return q, k, v, state


# (batch, heads, length, dk, dv, chunk): divisible and not, chunk 1, chunk > length, one chunk.
SHAPES = [
    (2, 3, 37, 8, 6, 5),
    (1, 4, 64, 8, 8, 16),
    (2, 2, 10, 4, 4, 10),
    (1, 2, 9, 4, 4, None),
    (1, 2, 7, 4, 6, 1),
    (3, 1, 5, 2, 3, 8),
    (1, 4, 700, 8, 8, 64),
    (1, 2, 1100, 4, 4, 4),  # 275 chunks: more than one segment of the chunk-decay product
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_chunkwise_equals_reference_and_recurrence(shape: tuple, with_state: bool) -> None:
    batch, heads, length, dk, dv, chunk = shape
    q, k, v, state = _inputs(length * 7 + heads, batch, heads, length, dk, dv, with_state=with_state)
    out, new_state = retention_chunkwise(q, k, v, state, chunk)
    ref_out, ref_state = retention_chunkwise_reference(q, k, v, state, chunk)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_state, ref_state, rtol=0, atol=1e-10)
    loop_out, loop_state = reference_retention(q, k, v, reference_gammas(heads), prev_state=state)
    torch.testing.assert_close(out, loop_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_state, loop_state, rtol=0, atol=1e-10)


@pytest.mark.parametrize("decay", ["log-spaced", "custom"])
def test_fast_chunkwise_other_decays_and_scale(decay: str) -> None:
    q, k, v, state = _inputs(3, 2, 3, 41, 6, 4, with_state=True)
    spec: str | torch.Tensor = decay
    if decay == "custom":  # gamma = 1 (no decay at all) is allowed and must stay exact
        spec = torch.tensor([1.0, 0.5, 0.97], dtype=F64)
    out, new_state = retention_chunkwise(q, k, v, state, 8, decay=spec, scale=0.3)
    ref_out, ref_state = retention_chunkwise_reference(q, k, v, state, 8, decay=spec, scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_state, ref_state, rtol=0, atol=1e-10)
    gammas = spec if isinstance(spec, torch.Tensor) else reference_gammas(3, decay)
    loop_out, loop_state = reference_retention(q, k, v, gammas, scale=0.3, prev_state=state)
    torch.testing.assert_close(out, loop_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_state, loop_state, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length, chunk", [(45, 16), (530, 2)])  # 530 / 2: two segments
def test_fast_chunkwise_gradients_equal_reference(length: int, chunk: int) -> None:
    q, k, v, state = _inputs(11, 2, 2, length, 4, 6, with_state=True)
    assert state is not None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, state)]
    weights = torch.randn(2, 2, length, 6, generator=torch.Generator().manual_seed(5), dtype=F64)

    def grads(fn: object) -> tuple[torch.Tensor, ...]:
        out, new_state = fn(*leaves, chunk)  # type: ignore[operator]
        loss = (out * weights).sum() + new_state.pow(2).sum()
        return torch.autograd.grad(loss, leaves)

    for fast, ref in zip(grads(retention_chunkwise), grads(retention_chunkwise_reference), strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)


def test_fast_chunkwise_float32_and_bfloat16() -> None:
    q, k, v, state = _inputs(2, 1, 4, 300, 16, 16, with_state=True)
    ref_out, ref_state = reference_retention(q, k, v, reference_gammas(4), prev_state=state)
    out32, state32 = retention_chunkwise(q.float(), k.float(), v.float(), state.float(), 64)  # type: ignore[union-attr]
    assert out32.dtype == torch.float32 and state32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state32.double(), ref_state, rtol=1e-4, atol=1e-4)
    bf = torch.bfloat16
    out16, state16 = retention_chunkwise(q.to(bf), k.to(bf), v.to(bf), state, 64)
    assert out16.dtype == bf and state16.dtype == torch.float32  # the state accumulates in float32
    ref16, _ = reference_retention(q.to(bf), k.to(bf), v.to(bf), reference_gammas(4), prev_state=state)
    torch.testing.assert_close(out16.double(), ref16, rtol=2e-2, atol=5e-2)


def test_cached_tables_match_uncached_powers() -> None:
    log_gamma = torch.log(reference_gammas(3))
    chunk, n, scale = 6, 5, 0.25
    tables = chunk_tables(log_gamma, chunk, n, F64, scale)
    j = torch.arange(chunk)
    torch.testing.assert_close(tables.inner[:, 0], decay_mask(log_gamma, chunk, F64) * scale, rtol=0, atol=1e-15)
    torch.testing.assert_close(tables.key_decay[:, 0, :, 0], decay_powers(log_gamma, chunk - 1 - j, F64) * scale)
    torch.testing.assert_close(tables.query_decay[:, 0, :, 0], decay_powers(log_gamma, j + 1, F64))
    torch.testing.assert_close(tables.chunk_decay.view(3), decay_powers(log_gamma, torch.tensor(chunk), F64))
    gamma = log_gamma.exp()
    for i in range(n):
        torch.testing.assert_close(tables.start[:, i, 0], gamma ** (chunk * i))
        for m in range(n):
            expected = gamma ** (chunk * (i - 1 - m)) if m < i else torch.zeros(3, dtype=F64)
            torch.testing.assert_close(tables.across[:, i, m], expected)
    # Same arguments, same cached object; a different dtype is a different entry.
    assert chunk_tables(log_gamma, chunk, n, F64, scale) is tables
    assert chunk_tables(log_gamma, chunk, n, torch.float32, scale).inner.dtype == torch.float32
    torch.testing.assert_close(scaled_decay_mask(log_gamma, 9, F64, 0.5), decay_mask(log_gamma, 9, F64) * 0.5)


def test_tables_built_under_inference_mode_still_train() -> None:
    # A cached inference tensor could not be saved for backward: the first call (e.g. in
    # generate()) happens under inference_mode, a later training step must still work.
    heads, length, chunk = 3, 24, 7  # sizes used nowhere else, so these tables are new here
    q, k, v, _ = _inputs(9, 1, heads, length, 6, 6, dtype=torch.float32)
    with torch.inference_mode():
        retention_chunkwise(q, k, v, None, chunk)
        retention_parallel(q, k, v)
    leaf = q.clone().requires_grad_(True)
    out, _ = retention_chunkwise(leaf, k, v, None, chunk)
    out_p, _ = retention_parallel(leaf, k, v)
    (out.sum() + out_p.sum()).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def _layer(value_factor: float, head_norm: str, bias: bool, relative_position: bool = True) -> MultiScaleRetention:
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, 4, value_factor=value_factor, head_norm=head_norm, bias=bias,
                                relative_position=relative_position).double()
    with torch.no_grad():  # move off the init values (zero biases, unit norm weights)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize(
    "value_factor, head_norm, bias, relative_position",
    [(1.0, "groupnorm", False, True), (2.0, "rmsnorm", True, True), (1.0, "groupnorm", True, False)],
)
@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_layer_fused_path_equals_plain_path(value_factor: float, head_norm: str, bias: bool,
                                            relative_position: bool, mode: str) -> None:
    layer = _layer(value_factor, head_norm, bias, relative_position)
    keys = sorted(layer.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 16, generator=gen, dtype=F64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, :4] = False  # left padding in the second row
    weights = torch.randn(2, 21, 16, generator=gen, dtype=F64)
    results = []
    for fast in (True, False):
        layer.fast_path = fast
        xin = x.clone().requires_grad_(True)
        first, state, _ = layer.retain(xin, xin, xin, None, mode, chunk_size=5, token_mask=mask)
        second, state2, _ = layer.retain(xin[:, :9], xin[:, :9], xin[:, :9], state, mode, chunk_size=4)
        loss = (first * weights).sum() + second.sum() + state2.memory.sum()
        grads = torch.autograd.grad(loss, [xin, *layer.parameters()])
        results.append((first, second, state.memory, state2.memory, *grads))
    for fast_value, plain_value in zip(*results, strict=True):
        torch.testing.assert_close(fast_value, plain_value, rtol=0, atol=1e-10)
    assert sorted(layer.state_dict()) == keys  # the fused weight is never a parameter or buffer


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_layer_under_bfloat16_autocast_trains(mode: str) -> None:
    # Under autocast the fused projection would come out in bfloat16 next to float32 rotation
    # factors; the layer must still run (forward and backward) and stay near its float32 output.
    torch.manual_seed(3)
    layer = MultiScaleRetention(32, 4, value_factor=1.0)
    x = torch.randn(2, 40, 32, requires_grad=True)
    expected, _, _ = layer.retain(x, x, x, None, mode, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, state, _ = layer.retain(x, x, x, None, mode, chunk_size=16)
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.isfinite(state.memory).all()
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_training_bench_flop_count_and_table() -> None:
    # The utilisation column's numerator, by hand: 4 heads of dk = dv = 64, chunk 128:
    # 3 * 4 * (2*128*64 + 2*128*64 + 4*64*64) per layer; linear layers 6 * P with P counted from
    # the real model (q, k, v, g, out: 5 * 256^2; FFN 2 * 256 * 512; head 256^2; 4 layers).
    from yet_another_retnet.bench import peers_training as bench
    from yet_another_retnet.models.config import RetNetConfig
    from yet_another_retnet.models.retnet import RetNet

    assert bench.retention_flops_per_token(128) == 3 * 4 * (2 * 128 * 64 * 2 + 4 * 64 * 64)
    assert bench.retention_flops_per_token(1024, chunkwise=False) == 3 * 4 * (2 * 1024 * 64 * 2)
    model = RetNet(RetNetConfig(d_model=256, num_heads=4, num_layers=4, ffn_dim=512, value_factor=1.0))
    params = bench._matmul_params(model)
    assert params == 4 * (5 * 256 * 256 + 2 * 256 * 512) + 256 * 256
    assert bench.model_flops_per_token(params, 128, True) == 6 * params + 4 * bench.retention_flops_per_token(128)
    section = {"matmul_gflops": 100.0, "shapes": ["2x1024"], "config": {"threads": 1, "clock": "cpu"},
               "rows": [{"impl": "x", "setting": "chunkwise 128", "tokens_per_s": {"2x1024": 1234.0},
                         "mfu": {"2x1024": 0.5}, "note": ""}]}
    table = bench.format_training_section(section)
    assert "| x | chunkwise 128 | 1,234 | 50% |  |" in table
    with pytest.raises(ValueError, match="clock"):
        bench.run_training_section(clock="sundial")
    with pytest.raises(ValueError, match="rounds"):
        bench.run_training_section(rounds=0)


def test_training_bench_interleaves_rounds_and_takes_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    from yet_another_retnet.bench import peers_training as bench

    calls: list[str] = []
    round_of = {"n": -1}

    def fake_worker(spec: dict[str, object], timeout: float) -> dict[str, object]:
        kind = str(spec["kind"])
        calls.append(kind)
        if kind == "matmul":
            round_of["n"] += 1
            return {"gflops": [100.0, 200.0, 400.0][round_of["n"]]}
        # every row gets faster by the round (the host speeding up), ours twice as fast as the peers
        speed = (1 + round_of["n"]) * (2000.0 if kind.startswith("ours") else 1000.0)
        return {"matmul_params": 1000, **{f"{b}x{L}": speed for b, L in spec["shapes"]}}  # type: ignore[attr-defined]

    monkeypatch.setattr(bench, "_run_worker", fake_worker)
    monkeypatch.setattr(bench, "_available", lambda kind: None)
    section = bench.run_training_section(quick=True, rounds=3)
    kinds = [kind for _, _, kind, _ in bench.ROWS]
    rows_per_round = len(kinds) + 1
    assert len(calls) == 3 * rows_per_round
    for r in range(3):  # each round: the matmul, then every row once, starting one row later
        assert calls[r * rows_per_round] == "matmul"
        assert calls[r * rows_per_round + 1] == kinds[r % len(kinds)]
    assert section["matmul_gflops"] == 200.0 and section["matmul_gflops_per_round"] == [100.0, 200.0, 400.0]
    ours = section["rows"][0]
    assert ours["per_round"]["2x1024"] == [2000.0, 4000.0, 6000.0] and ours["tokens_per_s"]["2x1024"] == 4000.0
    flops = ours["flops_per_token"]["2x1024"]
    # utilisation pairs each round's speed with that round's matmul: median of 2000/100, 4000/200, 6000/400
    assert ours["mfu"]["2x1024"] == pytest.approx(statistics.median([20.0, 20.0, 15.0]) * flops / 1e9)
    assert "median of 3 interleaved rounds" in bench.format_training_section(section)


def test_training_bench_divides_by_the_matmul_measured_in_the_same_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from yet_another_retnet.bench import peers_training as bench

    # The worker measures the matmul right before each shape and reports it beside the speed ...
    # (the faster backend counts: MKL is the slower one on AMD CPUs, oneDNN may be on others)
    measured = iter([{"aten": 150.0, "onednn": 120.0}, {"aten": 200.0, "onednn": 250.0}])
    monkeypatch.setattr(bench, "_matmul_gflops", lambda clock, repeats: next(measured))
    steps: list[tuple[int, ...]] = []

    class Model:
        def zero_grad(self, set_to_none: bool) -> None:
            pass

    result: dict[str, object] = {}
    ticks = iter(range(100))
    bench._time_shapes({"shapes": [(2, 8), (1, 16)], "repeats": 2}, Model(),
                       lambda x: steps.append(tuple(x.shape)), lambda: float(next(ticks)), result)
    assert result == {"2x8 matmul_gflops": 150.0, "2x8": 16.0, "2x8 steps": 2, "1x16 matmul_gflops": 250.0,
                      "1x16": 16.0, "1x16 steps": 2, "buffer_cache": None,
                      "2x8 matmul_backends": {"aten": 150.0, "onednn": 120.0},
                      "1x16 matmul_backends": {"aten": 200.0, "onednn": 250.0}}
    assert steps == [(2, 8)] * 3 + [(1, 16)] * 3  # a warm-up and two timed steps per shape (1 s each)

    # ... and the utilisation divides each round's speed by that, not by the round's own matmul.
    round_of = {"n": -1}

    def fake_worker(spec: dict[str, object], timeout: float) -> dict[str, object]:
        if spec["kind"] == "matmul":
            round_of["n"] += 1
            return {"gflops": 1000.0, "backends": {"aten": 500.0 + round_of["n"], "onednn": 1000.0}}
        speed, gflops = [(2000.0, 100.0), (4000.0, 400.0), (6000.0, 200.0)][round_of["n"]]
        return {"matmul_params": 1000, **{f"{b}x{L}": speed for b, L in spec["shapes"]},  # type: ignore[attr-defined]
                **{f"{b}x{L} matmul_gflops": gflops for b, L in spec["shapes"]}}  # type: ignore[attr-defined]

    monkeypatch.setattr(bench, "_run_worker", fake_worker)
    monkeypatch.setattr(bench, "_available", lambda kind: None)
    section = bench.run_training_section(quick=True, rounds=3)
    ours = section["rows"][0]
    flops = ours["flops_per_token"]["2x1024"]
    assert ours["mfu"]["2x1024"] == pytest.approx(statistics.median([20.0, 10.0, 30.0]) * flops / 1e9)
    assert section["matmul_gflops"] == 1000.0
    assert bench.matmul_backends_summary(section) == "torch.matmul (MKL) 501, oneDNN 1000"
    assert "(torch.matmul (MKL) 501, oneDNN 1000; the faster counts)" in bench.format_training_section(section)


@pytest.mark.parametrize(("length", "chunk"), [(1, 1), (7, 3), (12, 4), (5, 8), (700, 2), (1030, 4), (515, 2)])
def test_chunkwise_table_shapes_lists_what_the_fast_path_asks_for(length: int, chunk: int) -> None:
    # A compiled caller hands in exactly these tables; the eager path must ask for no others.
    from yet_another_retnet.ops.decay import resolve_log_decay
    from yet_another_retnet.ops.retention import chunkwise_table_shapes, chunkwise_with_tables

    q, k, v = (torch.randn(1, 2, length, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    log_gamma = resolve_log_decay(None, 2, q.device)
    asked = []

    def lookup(c: int, n: int) -> ChunkTables:
        asked.append((c, n))
        return chunk_tables(log_gamma, c, n, torch.float64, 4**-0.5)

    out, state = chunkwise_with_tables(q, k, v, None, min(chunk, length), lookup)
    assert list(dict.fromkeys(asked)) == chunkwise_table_shapes(length, min(chunk, length))
    want, want_state = retention_chunkwise(q, k, v, chunk_size=chunk)
    assert torch.allclose(out, want, atol=1e-12) and torch.allclose(state, want_state, atol=1e-12)


def test_training_bench_times_short_steps_for_at_least_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from yet_another_retnet.bench import peers_training as bench

    monkeypatch.setattr(bench, "_matmul_gflops", lambda clock, repeats: {"aten": 100.0})

    class Model:
        def zero_grad(self, set_to_none: bool) -> None:
            pass

    # Steps of 0.3 s: two are 0.6 s, so it times four (1.2 s) and reports their median.
    durations = iter([0.3] * 20)
    now = {"t": 0.0}

    def clock() -> float:
        return now["t"]

    def step(x: object) -> None:
        now["t"] += next(durations)

    result: dict[str, object] = {}
    bench._time_shapes({"shapes": [(1, 6)], "repeats": 2}, Model(), step, clock, result)
    assert result["1x6 steps"] == 4
    assert result["1x6"] == pytest.approx(6 / 0.3)
    # Very short steps: capped at MAX_TIMED_STEPS.
    durations = iter([0.01] * 100)
    bench._time_shapes({"shapes": [(1, 6)], "repeats": 2}, Model(), step, clock, result)
    assert result["1x6 steps"] == bench.MAX_TIMED_STEPS
