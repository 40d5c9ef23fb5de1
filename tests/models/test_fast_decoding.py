"""The fast decoding step (``RetNet.fast_decode``) against the plain layer-by-layer recurrent path.

The reference is the same model with ``fast_decode = False``: ``retain(..., "recurrent")`` through
``ops.retention_recurrent``, which the other test files check against independent float64
references. Tolerances: float64 1e-10, float32 1e-5 (relative to the largest logit), and for
bfloat16 weights the documented 5e-2 of the largest float32 logit.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.layers import retention as retention_module

VOCAB = 41
VARIANTS: dict[str, dict[str, Any]] = {
    "paper (value x2, groupnorm, mlp)": {},
    "torchscale-like (glu, rmsnorm, embed scale, tied)": {
        "ffn": "glu", "block_norm": "rmsnorm", "head_norm": "rmsnorm", "embed_scale": 4.0, "tie_embeddings": True,
    },
    "post-norm, residual scale, swish ffn": {"pre_norm": False, "residual_scale": 1.7, "activation": "swish"},
    "biases, embedding norm, log-spaced decay": {"bias": True, "embedding_norm": True, "decay": "log-spaced"},
    "no rotation, no gate activation, value x1": {"relative_position": False, "gate_activation": "identity",
                                                  "value_factor": 1.0},
}


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": VOCAB, "d_model": 16, "num_heads": 2, "num_layers": 2, "ffn_dim": 24,
                              "dropout": 0.0, "chunk_size": 5, "tie_embeddings": False}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = RetNet(RetNetConfig(**fields)).to(dtype).eval()
    with torch.no_grad():
        # Move every parameter off its initial value (norm weights at 1, biases at 0) so that a
        # dropped or swapped term in the fast step cannot go unnoticed; bigger embeddings give
        # logits well apart.
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.embed_tokens.weight.mul_(20.0)
    return model


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def steps(model: RetNet, fast: bool, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """Prefill ``prompt`` (chunkwise), then feed ``tokens`` one at a time; logits of every step."""
    model.fast_decode = fast
    with torch.inference_mode():
        state = model(prompt, mode="chunkwise").state
        logits = []
        for t in range(tokens.shape[1]):
            out = model(tokens[:, t : t + 1], state=state, mode="recurrent")
            logits.append(out.logits)
            state = out.state
    return logits, state


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_step_equals_the_recurrent_reference(variant: str, dtype: torch.dtype, tol: float) -> None:
    model = make_model(dtype, **VARIANTS[variant])
    prompt, tokens = ids(3, 7, seed=1), ids(3, 6, seed=2)
    fast, fast_state = steps(model, True, prompt, tokens)
    ref, ref_state = steps(model, False, prompt, tokens)
    for got, want in zip(fast, ref, strict=True):
        assert got.shape == want.shape == (3, 1, VOCAB) and got.dtype == want.dtype == dtype
        assert rel(got, want) < tol, (variant, rel(got, want))
    assert torch.equal(fast_state.position, ref_state.position)
    for got, want in zip(fast_state.memories, ref_state.memories, strict=True):
        assert got.dtype == want.dtype and rel(got, want) < tol


def test_fast_step_from_an_empty_state_and_far_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    x = ids(2, 1, seed=3)
    with torch.inference_mode():
        model.fast_decode = True
        got = model(x, mode="recurrent")
        model.fast_decode = False
        want = model(x, mode="recurrent")
    assert rel(got.logits, want.logits) < 1e-10 and torch.equal(got.state.position, torch.ones(2, dtype=torch.long))
    # Positions past the first rotation table (1024 rows) grow it; past the table limit the rows
    # are computed per step. Both must give the reference's rotation.
    prompt, tokens = ids(2, 1100, seed=4), ids(2, 3, seed=5)
    fast, _ = steps(model, True, prompt, tokens)
    ref, _ = steps(model, False, prompt, tokens)
    assert max(rel(a, b) for a, b in zip(fast, ref, strict=True)) < 1e-10
    monkeypatch.setattr(retention_module, "_MAX_ROTATION_TABLE", 512)
    for layer in model.decoder.layers:
        layer.retention.__dict__.pop("_rotation_cache", None)
    fast, _ = steps(model, True, prompt, tokens)
    assert max(rel(a, b) for a, b in zip(fast, ref, strict=True)) < 1e-10


def test_left_padded_rows_at_different_positions() -> None:
    model = make_model()
    prompt = ids(3, 9, seed=6)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    mask[2, :7] = 0
    outs = {}
    for fast in (True, False):
        model.fast_decode = fast
        outs[fast] = model.generate(prompt, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(outs[True], outs[False])
    # And each row still gets what its prompt alone gives.
    model.fast_decode = True
    alone = model.generate(prompt[2:, 7:], max_new_tokens=8)
    assert torch.equal(outs[True][2, 7:], alone[0])


def test_sampling_is_reproducible_and_identical_to_the_reference() -> None:
    model = make_model()
    prompt = ids(2, 5, seed=7)
    outs = []
    for fast in (True, False, True):
        model.fast_decode = fast
        outs.append(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=10,
                                   generator=torch.Generator().manual_seed(11)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bfloat16_weights_stay_within_the_stated_tolerance_of_float32() -> None:
    # Documented in docs/model.md: bfloat16 weights (state and retention kept in float32) give
    # logits within 5e-2 of the largest float32 logit over a prefill and 8 decoding steps.
    model32 = make_model(torch.float32, d_model=32, num_heads=4, ffn_dim=48, num_layers=3)
    model16 = make_model(torch.float32, d_model=32, num_heads=4, ffn_dim=48, num_layers=3).to(torch.bfloat16)
    prompt, tokens = ids(2, 11, seed=8), ids(2, 8, seed=9)
    want, _ = steps(model32, False, prompt, tokens)
    got, state = steps(model16, True, prompt, tokens)
    ref16, _ = steps(model16, False, prompt, tokens)
    assert all(m.dtype == torch.float32 for m in state.memories)  # the state never drops to bf16
    for g, w, r in zip(got, want, ref16, strict=True):
        assert g.dtype == torch.bfloat16
        assert rel(g, w) < 5e-2, rel(g, w)
        assert rel(g, r) < 5e-2, rel(g, r)  # and as close to bf16's own reference path


def test_cached_fused_weights_follow_weight_changes_and_stay_out_of_the_state_dict() -> None:
    model = make_model(ffn="glu", bias=True)
    keys = sorted(model.state_dict())
    prompt, tokens = ids(2, 6, seed=10), ids(2, 3, seed=11)
    steps(model, True, prompt, tokens)  # builds the caches
    assert sorted(model.state_dict()) == keys  # no fused tensor leaks into checkpoints
    # In-place edits (an optimiser step, load_state_dict) and replaced tensors must both be seen.
    other = make_model(ffn="glu", bias=True, seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        model.decoder.layers[0].retention.k_proj.weight.mul_(1.5)
        model.decoder.layers[1].ffn.gate.bias.add_(0.3)
    model.decoder.layers[1].retention.v_proj.weight = torch.nn.Parameter(
        model.decoder.layers[1].retention.v_proj.weight.detach() * -1.0)
    fast, _ = steps(model, True, prompt, tokens)
    ref, _ = steps(model, False, prompt, tokens)
    assert max(rel(a, b) for a, b in zip(fast, ref, strict=True)) < 1e-10
    # A dtype change rebuilds them too.
    model.float()
    fast, _ = steps(model, True, prompt, tokens)
    ref, _ = steps(model, False, prompt, tokens)
    assert max(rel(a, b) for a, b in zip(fast, ref, strict=True)) < 1e-5


def test_fast_step_leaves_the_callers_state_alone_and_skips_training() -> None:
    model = make_model()
    prompt = ids(2, 6, seed=12)
    with torch.no_grad():
        state = model(prompt, mode="chunkwise").state
        before = [m.clone() for m in state.memories]
        model(ids(2, 1, seed=13), state=state, mode="recurrent")
    assert all(torch.equal(a, b) for a, b in zip(state.memories, before, strict=True))
    # With autograd on (or in train mode) the plain path runs: gradients reach every projection.
    out = model(ids(2, 1, seed=13), state=state, mode="recurrent")
    out.logits.sum().backward()
    retention = model.decoder.layers[0].retention
    assert all(p.weight.grad is not None for p in (retention.q_proj, retention.k_proj, retention.v_proj))
    calls: list[int] = []
    original = type(model.decoder).step_layers

    def spy(self: Any, *args: Any) -> Any:
        calls.append(1)
        return original(self, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(type(model.decoder), "step_layers", spy)
    try:
        with torch.no_grad():
            model.train()
            model(ids(2, 1, seed=13), state=state, mode="recurrent")
            assert not calls
            model.eval()
            model(ids(2, 1, seed=13), state=state, mode="recurrent")
            assert len(calls) == 1
            model.generate(prompt, max_new_tokens=4)
            assert len(calls) == 4  # one fast step per new token after the first
    finally:
        mp.undo()


def test_release_decode_cache_frees_the_copies_and_decoding_still_matches() -> None:
    model = make_model(ffn="glu")
    prompt, tokens = ids(1, 4, seed=14), ids(1, 3, seed=15)
    fast, _ = steps(model, True, prompt, tokens)
    # The copies live in the decoder's decoding plan: a stacked q/k/v/g per retention layer and a
    # stacked fc1/gate per GLU, each a copy (not a view) of the weights.
    plan = model.decoder.__dict__["_decoding_plan"]
    stacked = [t for (attn, glu) in plan.tables for t in (attn[0], glu[0])]
    assert len(stacked) == 2 * model.config.num_layers  # every retention layer and every GLU
    weights = {p.data_ptr() for p in model.parameters()}
    assert not any(t.data_ptr() in weights for t in stacked)
    model.release_decode_cache()
    assert "_decoding_plan" not in model.decoder.__dict__
    assert not any({"_decode_cache", "_stacked_cache", "_rotation_cache"} & set(m.__dict__) for m in model.modules())
    again, _ = steps(model, True, prompt, tokens)
    assert all(torch.equal(a, b) for a, b in zip(fast, again, strict=True))


def test_peer_report_ratios_and_targets() -> None:
    from yet_another_retnet.bench import peers

    decode = [
        {"impl": "ours", "context": 512, "ms_per_token": 10.0, "weight_mb": 300.0, "read_gbps": 60.0},
        {"impl": "ours-bf16", "context": 512, "ms_per_token": 5.0, "weight_mb": 150.0},
        {"impl": "yaretnet-0.5.1", "context": 512, "ms_per_token": 14.0},
        {"impl": "torchscale-0.3.0", "context": 512, "ms_per_token": 12.0},
        {"impl": "hf-llama", "context": 512, "error": "boom"},
    ]
    results = {"decode": decode, "prefill": [{"impl": "ours", "tokens_per_s": 300.0},
                                             {"impl": "yaretnet-0.5.1", "tokens_per_s": 100.0}],
               "small": [{"impl": "ours", "ms_per_token": 1.2}], "training": None}
    summary = peers.summarise(results, [512])
    entry = summary["decode"]["512"]
    assert entry["best_peer"] == "torchscale-0.3.0"  # the failed row is no peer
    assert entry["ours"]["ratio"] == pytest.approx(1.2) and entry["ours-bf16"]["ratio"] == pytest.approx(2.4)
    assert entry["ours"]["floor_ms"] == pytest.approx(5.0) and entry["ours"]["over_floor"] == pytest.approx(2.0)
    assert [t["pass"] for t in summary["targets"]] == [False, False, True, False]
    assert summary["prefill_ratio"] == pytest.approx(3.0)
    data = {"results": results, "summary": summary, "machine": {}, "command": "x",
            "settings": {"repeats": 1, "tokens": 1, "contexts": [512], "prefill_length": 8, "skipped": {}}}
    text = peers.render_markdown(data)
    assert "| 1.2 | FAIL |" in text and "| 3 | PASS |" in text and "boom" in text


def test_peer_rounds_give_the_median_round_and_keep_every_round() -> None:
    from yet_another_retnet.bench import peers

    decode = [{"ms_per_token": 3.0, "ms_min": 2.5}, {"error": "killed"}, {"ms_per_token": 1.0, "ms_min": 0.9},
              {"ms_per_token": 2.0, "ms_min": 1.8}]
    row = peers.combine_rounds(decode, "ms_per_token", higher_is_better=False)
    # The median of the three good rounds, with that round's other fields; the failure counted.
    assert row["ms_per_token"] == 2.0 and row["ms_min"] == 1.8
    assert row["rounds"] == [3.0, 1.0, 2.0] and row["failed_rounds"] == 1
    prefill = [{"tokens_per_s": 100.0}, {"tokens_per_s": 300.0}]
    assert peers.combine_rounds(prefill, "tokens_per_s", higher_is_better=True)["tokens_per_s"] == 100.0
    assert peers.combine_rounds([{"error": "a"}, {"error": "b"}], "tokens_per_s", True) == {"error": "a"}
    results = {"decode": [], "prefill": [{"impl": "ours", "chunk": 128, **peers.combine_rounds(prefill, "tokens_per_s", True)}],
               "small": [], "training": None}
    data = {"results": results, "summary": peers.summarise(results, [512]), "machine": {}, "command": "x",
            "settings": {"repeats": 1, "rounds": 2, "tokens": 4, "contexts": [512], "prefill_length": 8, "skipped": {}}}
    text = peers.render_markdown(data)
    assert "median of 2 interleaved rounds" in text and "| 100 | – | 100, 300 |" in text


def test_training_targets_take_our_best_row_against_the_best_peer() -> None:
    from yet_another_retnet.bench import peers, peers_training

    def row(impl: str, setting: str, speeds: list[float], mfus: list[float]) -> dict[str, object]:
        shapes = ["2x1024", "1x4096", "1x16384"]
        return {"impl": impl, "setting": setting, "tokens_per_s": dict(zip(shapes, speeds, strict=True)),
                "mfu": dict(zip(shapes, mfus, strict=True)), "note": ""}

    section = {"shapes": ["2x1024", "1x4096", "1x16384"], "matmul_gflops": 300.0, "rows": [
        row("yet_another_retnet (ours)", "plain", [9_000.0, 9_000.0, 7_000.0], [0.5, 0.5, 0.4]),
        row("yet_another_retnet (ours)", "fast", [10_000.0, 11_000.0, 12_000.0], [0.6, 0.66, 0.7]),
        row("torchscale 0.3.0", "chunkwise", [8_000.0, 7_000.0, 6_000.0], [0.4, 0.4, 0.3]),
        row("HF Llama (SDPA)", "attention", [9_000.0, 5_000.0, 1_000.0], [0.5, 0.6, 0.6]),
    ]}
    targets = peers_training.training_targets(section)
    values = [(t["value"], t["pass"]) for t in targets]
    assert values == [(pytest.approx(10 / 9), False), (0.6, False), (pytest.approx(11 / 7), True), (0.66, True),
                      (pytest.approx(2.0), True), (0.7, True), (pytest.approx(10 / 12), False)]
    assert "(fast)" in targets[0]["target"] and "HF Llama" in targets[0]["target"]
    summary = peers.summarise({"decode": [], "prefill": [], "small": [], "training": section}, [512])
    assert summary["targets"] == targets
    assert "- FAIL training 2x1024" in peers_training.format_training_section(section)


def test_a_model_built_under_inference_mode_decodes_fast() -> None:
    # Its weights are inference tensors, which keep no version counter: the caches must cope.
    with torch.inference_mode():
        model = make_model(ffn="glu")
        prompt = ids(2, 5, seed=16)
        fast = model.generate(prompt, max_new_tokens=6)
    model.fast_decode = False
    assert torch.equal(fast, model.generate(prompt, max_new_tokens=6))


@pytest.mark.slow
def test_compiled_decode_step_equals_the_eager_step_and_can_be_switched_off() -> None:
    # torch.compile of the whole step (embedding .. LM head): same logits as the eager fast step
    # and the reference path, same greedy tokens, rows at different positions (left padding).
    # By default, steps the one-call layer kernels take (CPU float32 here) stay on them, bit for
    # bit the eager step; keep_kernel_steps=False sends them through the graph.
    from torch._dynamo.utils import counters

    from yet_another_retnet.ops import _extension

    model = make_model(torch.float32, ffn="glu", bias=True, d_model=32, num_heads=4, ffn_dim=48)
    prompt, tokens = ids(2, 7, seed=17), ids(2, 5, seed=18)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    eager, eager_state = steps(model, True, prompt, tokens)
    ref, _ = steps(model, False, prompt, tokens)
    eager_tokens = model.generate(prompt, max_new_tokens=6, attention_mask=mask)
    kernels = model.decoder._step_plans(torch.float32) is not None
    assert kernels == _extension.load()  # without a C++ toolchain every step takes the graph

    graphs = counters["stats"]["unique_graphs"]
    assert model.compile_decode() is model
    kept, _ = steps(model, True, prompt, tokens)
    if kernels:
        assert counters["stats"]["unique_graphs"] == graphs
        assert all(torch.equal(a, b) for a, b in zip(kept, eager, strict=True))
    model.compile_decode(keep_kernel_steps=False)
    compiled, compiled_state = steps(model, True, prompt, tokens)
    assert counters["stats"]["unique_graphs"] > graphs  # the step really went through dynamo
    for got, want, base in zip(compiled, eager, ref, strict=True):
        assert rel(got, want) < 1e-5 and rel(got, base) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(compiled_state.memories, eager_state.memories, strict=True))
    assert torch.equal(model.generate(prompt, max_new_tokens=6, attention_mask=mask), eager_tokens)
    model.compile_decode(False)
    assert "_compiled_decode" not in model.__dict__
    again, _ = steps(model, True, prompt, tokens)
    assert all(torch.equal(a, b) for a, b in zip(again, eager, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_chunkwise_equals_eager_outputs_states_and_gradients(dtype: torch.dtype) -> None:
    # RetNet.compile_chunkwise: the fused chunkwise form of every layer through torch.compile.
    # Lengths that chunk_size does not divide, a previous state, left padding. float32 on CPU:
    # the graph calls the split kernel; float64: inductor rotates q and k in halves.
    model = make_model(dtype, d_model=32, num_heads=4, ffn_dim=48, bias=True, chunk_size=8)
    model.train()
    prompt, more = ids(2, 21, seed=19), ids(2, 13, seed=20)
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad()
        first = model(prompt, mode="chunkwise", attention_mask=mask)
        second = model(more, state=first.state, mode="chunkwise")
        (first.logits.square().mean() + second.logits.square().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return [first.logits, second.logits, *second.state.memories], grads

    eager_out, eager_grads = run()
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    from yet_another_retnet.ops import _extension

    kernels = dtype == torch.float32 and _extension.load()
    if kernels:  # by default a CPU float32 call stays on the kernels: no graph, the same numbers
        assert model.compile_chunkwise() is model
        kept, kept_grads = run()
        assert counters["stats"]["unique_graphs"] == graphs
        assert all(torch.equal(a, b) for a, b in zip([*kept, *kept_grads], [*eager_out, *eager_grads], strict=True))
    assert model.compile_chunkwise(keep_kernel_calls=False) is model
    out, grads = run()
    assert counters["stats"]["unique_graphs"] > graphs
    # One graph per layer call: a break would split it, each piece run and differentiated apart.
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    assert len(grads) == len(eager_grads) == len(list(model.parameters()))
    for got, want in zip([*out, *grads], [*eager_out, *eager_grads], strict=True):
        assert rel(got.detach(), want.detach()) < 1e-5
    model.compile_chunkwise(False)
    assert not any("_compiled_chunkwise" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("variant", ["float32", "post-norm", "int8", "int4", "float64"])
def test_step_in_place_equals_the_allocating_step(variant: str) -> None:
    """``RetNet.step_`` overwrites the state with what ``model(ids, state=...)`` returns: the layer
    kernels write into the old memories (float32, int8, int4), the other routes (a post-norm layer,
    float64) are copied in; positions advance; a wrong shape is refused."""
    from yet_another_retnet.models.quantized import quantize_model

    dtype = torch.float64 if variant == "float64" else torch.float32
    model = make_model(dtype, seed=5, **({"pre_norm": False} if variant == "post-norm" else {}))
    if variant in ("int8", "int4"):
        model = quantize_model(model, variant)
    prompt = ids(3, 6, seed=6)
    with torch.inference_mode():
        state = model.prefill(prompt).state
    memories = [m.clone() for m in state.memories]
    position = state.position.clone()
    tokens = ids(3, 4, seed=7)
    want = state
    for t in range(4):
        with torch.inference_mode():
            out = model(tokens[:, t:t + 1], state=want)
        logits = model.step_(tokens[:, t], state)
        want = out.state
        assert torch.equal(logits, out.logits[:, -1])
        assert all(torch.equal(a, b) for a, b in zip(state.memories, want.memories, strict=True))
        assert torch.equal(state.position, want.position)
    assert torch.equal(state.position, position + 4)
    assert not any(torch.equal(a, b) for a, b in zip(state.memories, memories, strict=True))
    with pytest.raises(ValueError, match="ids must be"):
        model.step_(tokens[:2, 0], state)


@pytest.mark.parametrize("quantized", [False, True])
def test_a_decoding_plan_goes_stale_on_every_kind_of_change(quantized: bool) -> None:
    """DecodingPlan.valid: true while nothing it was built from changed; false after an in-place
    edit of a weight (float or quantized buffer), a replaced parameter or a replaced module."""
    from yet_another_retnet.models.decoding import build_plan, decoding_plan
    from yet_another_retnet.models.quantized import build_quantized_plan, quantize_model

    model = make_model(dtype=torch.float32, ffn="glu", bias=True)
    if quantized:
        model = quantize_model(model, "int4")
    builder = build_quantized_plan if quantized else build_plan
    layer = model.decoder.layers[1]
    edits = [
        lambda: layer.retention.k_proj.weight_scale.mul_(1.5) if quantized else layer.retention.k_proj.weight.mul_(1.5),
        lambda: layer.ffn.fc1.bias.add_(0.25),
        lambda: setattr(layer.retention.out_proj, "bias", torch.nn.Parameter(layer.retention.out_proj.bias.detach() * 2)),
        lambda: setattr(layer, "ffn", layer.ffn),  # the same module put back: still valid
        lambda: setattr(layer.ffn, "gate", copy.deepcopy(layer.ffn.gate)),  # an equal copy: a new object
    ]
    expected = [False, False, False, True, False]
    for edit, stays in zip(edits, expected, strict=True):
        plan = decoding_plan(model.decoder, torch.float32, builder)
        assert plan.valid()
        with torch.no_grad():
            edit()
        assert plan.valid() is stays
        if not stays:
            assert decoding_plan(model.decoder, torch.float32, builder) is not plan
