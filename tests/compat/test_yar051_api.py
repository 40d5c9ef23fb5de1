"""yet-another-retnet 0.5.1's API and checkpoints on this package (docs/migrating-from-0.5.md).

Our own tests, written from 0.5.1's documented signatures. The checkpoint tests use 0.5.1 itself
as the oracle: installed into a separate folder (``pip install --no-deps --target
.peers/yaretnet051 yet-another-retnet==0.5.1 einops``, as scripts/install-test-peers.sh does, or
``$YARETNET051_PATH``) and run in a subprocess, since both packages are ``yet_another_retnet``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from yet_another_retnet import RetentionState, RetNetState
from yet_another_retnet import RetNet as OurRetNet
from yet_another_retnet.bench.peers import default_peer_dir
from yet_another_retnet.cli import main as cli_main
from yet_another_retnet.retention import MultiScaleRetention
from yet_another_retnet.retnet import RetNet, RetNetDecoder, RetNetDecoderLayer, retnet_1_3b

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Two 0.5.1 model shapes: pre-norm with swish, and post-norm with GELU and another eps.
SHAPES = {
    "pre": {"num_tokens": 61, "d_model": 32, "nhead": 2, "num_layers": 2, "dim_feedforward": 48},
    "post": {"num_tokens": 40, "d_model": 48, "nhead": 3, "num_layers": 3, "dim_feedforward": 64,
             "norm_first": False, "activation": "gelu", "layer_norm_eps": 1e-5},
}
#: What from_yar051 needs besides the weights.
HIDDEN = ("norm_first", "activation", "layer_norm_eps")

ORACLE = r"""
import sys, torch
import yet_another_retnet
assert yet_another_retnet.__file__.startswith(sys.argv[1]), yet_another_retnet.__file__
from yet_another_retnet.retnet import RetNet
job = torch.load(sys.argv[2])
out = {}
for name, spec in job["shapes"].items():
    torch.manual_seed(len(name))
    net = RetNet(**spec).eval()
    ids = job["ids"][name]
    with torch.no_grad():
        # the oracle's own weights, logits and loss
        out[name] = {"state_dict": net.state_dict(), "logits": net.forward_parallel(ids),
                     "loss": net(ids, ids.roll(1, dims=1))}
        # a state dict written by our adapter, loaded by 0.5.1 (strict)
        mine = RetNet(**spec).eval()
        mine.load_state_dict(job["ours"][name])
        out[name]["ours_logits"] = mine.forward_parallel(ids)
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """0.5.1's weights and outputs for both shapes, and its outputs on our adapter's weights."""
    peer = default_peer_dir()
    if not (peer / "yet_another_retnet" / "retnet.py").is_file():
        pytest.skip(f"yet-another-retnet 0.5.1 not installed in {peer} (scripts/install-test-peers.sh)")
    tmp = tmp_path_factory.mktemp("yar051")
    gen = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(0, s["num_tokens"], (2, 11), generator=gen) for n, s in SHAPES.items()}
    ours = {}
    for name, spec in SHAPES.items():
        torch.manual_seed(100 + len(name))
        ours[name] = RetNet(**spec).state_dict()
    torch.save({"shapes": SHAPES, "ids": ids, "ours": ours}, tmp / "job.pt")
    env = {**os.environ, "PYTHONPATH": str(peer)}
    done = subprocess.run([sys.executable, "-c", ORACLE, str(peer), str(tmp / "job.pt"), str(tmp / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return ids, ours, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", list(SHAPES))
def test_051_checkpoint_loads_and_matches_051(oracle, name, tmp_path):
    ids, ours, out = oracle
    spec, theirs = SHAPES[name], out[name]
    scale = theirs["logits"].abs().max()
    tol = {"rtol": 0, "atol": 1e-5 * float(scale)}
    # Old code, old checkpoint: the 0.5.1 API loads it as it is.
    net = RetNet(**spec).eval()
    net.load_state_dict(theirs["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(net.forward_parallel(ids[name]), theirs["logits"], **tol)
        torch.testing.assert_close(net(ids[name], ids[name].roll(1, dims=1)), theirs["loss"], rtol=1e-5, atol=1e-6)
    # It writes the checkpoint back with 0.5.1's keys (thetas to rounding: ours come from float64).
    back = net.state_dict()
    assert set(back) == set(theirs["state_dict"])
    for key, value in theirs["state_dict"].items():
        torch.testing.assert_close(back[key], value, rtol=0 if "thetas" not in key else 1e-6, atol=0)
    # Into our model: all three forms reproduce 0.5.1's parallel logits.
    model = OurRetNet.from_yar051(theirs["state_dict"], **{k: spec[k] for k in HIDDEN if k in spec})
    with torch.no_grad():
        for mode in ("parallel", "chunkwise", "recurrent"):
            torch.testing.assert_close(model(ids[name], mode=mode, chunk_size=4).logits, theirs["logits"], **tol)
        # token by token: the fast decoding step (post-norm branch style, the head's bias)
        state, steps = None, []
        for t in range(ids[name].shape[1]):
            out = model(ids[name][:, t:t + 1], state=state)
            state = out.state
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), theirs["logits"], **tol)
    # Our adapter's own weights give 0.5.1 what they give us.
    mine = RetNet(**spec).eval()
    mine.load_state_dict(ours[name])
    with torch.no_grad():
        torch.testing.assert_close(mine.forward_parallel(ids[name]), theirs["ours_logits"], **tol)
    # The converter command: the same logits from the directory it writes.
    torch.save(theirs["state_dict"], tmp_path / "old.pt")
    args = ["convert", "--from", "yar051", str(tmp_path / "old.pt"), str(tmp_path / "new")]
    if spec.get("norm_first") is False:
        args.append("--post-norm")
    args += ["--activation", spec.get("activation", "swish"), "--layer-norm-eps", str(spec.get("layer_norm_eps", 1e-6))]
    assert cli_main(args) == 0
    converted = OurRetNet.from_pretrained(tmp_path / "new").eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids[name]).logits, theirs["logits"], **tol)


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    assert cli_main(["convert", "--from", "yar051", str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr()
    assert "code ran" not in err.out and "weights_only" in err.err and len(err.err.strip().splitlines()) == 1
    torch.save({"embedding.weight": torch.zeros(5, 8)}, tmp_path / "partial.pt")
    assert cli_main(["convert", "--from", "yar051", str(tmp_path / "partial.pt"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="nhead=4 disagrees"):
        OurRetNet.from_yar051(RetNet(20, d_model=16, nhead=2, num_layers=1).state_dict(), nhead=4)


# ------------------------------------------------------------------------------------------------
# MultiScaleRetention: 0.5.1's signatures on our layer
# ------------------------------------------------------------------------------------------------


def test_layer_takes_051_positional_order_and_names():
    # (embed_dim, num_heads, dropout, relative_position, bias, batch_first, activation,
    #  group_norm_eps, device, dtype)
    layer = MultiScaleRetention(16, 2, 0.25, False, True, True, "relu", 1e-5, "cpu", F64)
    assert (layer.dropout, layer.relative_position, layer.gate_activation, layer.norm_eps) == (0.25, False, "relu", 1e-5)
    assert layer.q_proj.bias is not None and layer.q_proj.weight.dtype == F64
    assert MultiScaleRetention(16, 2, activation=F.gelu).gate_activation == "gelu"
    assert MultiScaleRetention(16, 2).value_dim == 32  # our defaults otherwise: value width 2 d
    with pytest.raises(NotImplementedError, match="batch_first"):
        MultiScaleRetention(16, 2, batch_first=False)
    with pytest.raises(ValueError, match="activation"):
        MultiScaleRetention(16, 2, activation=torch.tanh)
    with pytest.raises(ValueError, match="disagree"):
        MultiScaleRetention(16, 2, activation="relu", gate_activation="gelu")
    with pytest.raises(ValueError, match="disagree"):
        MultiScaleRetention(16, 2, group_norm_eps=1e-5, norm_eps=1e-3)


def test_layer_051_calls_equal_the_new_forms():
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, 2, dtype=F64).eval()
    x = torch.randn(2, 9, 16, dtype=F64)
    y, weights = layer.forward_parallel(x, x, x, need_weights=True)
    y_old, weights_old = layer.forward_parallel(x, x, x, True)  # 0.5.1: need_weights 4th
    torch.testing.assert_close(y_old, y)
    assert weights is not None and weights_old is not None and weights_old.shape == (2, 2, 9, 9)
    torch.testing.assert_close(layer(x, x, x, True)[1], weights)
    _, new_state = layer.forward_chunkwise(x, x, x, chunk_size=4)

    # forward_recurrent(q, k, v, seq_idx, prev_state): positional and by keyword, plain tensors
    state = None
    for t in range(9):
        xt = x[:, t]
        if t % 2:
            out, state = layer.forward_recurrent(xt, xt, xt, t, state)
        else:
            out, state = layer.forward_recurrent(xt, xt, xt, seq_idx=t, prev_state=state)
        assert isinstance(state, torch.Tensor)
        torch.testing.assert_close(out, y[:, t])
    torch.testing.assert_close(state, new_state.memory)

    # forward_chunkwise(q, k, v, start_idx, prev_state) from the recurrent state at 5
    state = None
    for t in range(5):
        _, state = layer.forward_recurrent(x[:, t], x[:, t], x[:, t], seq_idx=t, prev_state=state)
    part, state = layer.forward_chunkwise(x[:, 5:7], x[:, 5:7], x[:, 5:7], 5, state)
    rest, state = layer.forward_chunkwise(x[:, 7:], x[:, 7:], x[:, 7:], start_idx=7, prev_state=state)
    torch.testing.assert_close(torch.cat([part, rest], dim=1), y[:, 5:])
    torch.testing.assert_close(state, new_state.memory)

    # an index without a state: the tokens sit at that position (0.5.1's rotation at start_idx)
    shifted, _ = layer.forward_chunkwise(x[:, :4], x[:, :4], x[:, :4], start_idx=3)
    zero = RetentionState(torch.zeros_like(new_state.memory), torch.full((2,), 3))
    expected, _ = layer.forward_chunkwise(x[:, :4], x[:, :4], x[:, :4], zero)
    torch.testing.assert_close(shifted, expected)


def test_layer_index_and_state_must_agree():
    layer = MultiScaleRetention(16, 2, dtype=F64)
    x = torch.randn(2, 4, 16, dtype=F64)
    _, state = layer.forward_chunkwise(x, x, x)  # a RetentionState at position 4
    y, plain = layer.forward_recurrent(x[:, 0], x[:, 0], x[:, 0], seq_idx=4, prev_state=state)
    y_new, new = layer.forward_recurrent(x[:, 0], x[:, 0], x[:, 0], state)
    torch.testing.assert_close(y, y_new)
    torch.testing.assert_close(plain, new.memory)
    with pytest.raises(ValueError, match=r"seq_idx=3 disagrees with prev_state.position \[4, 4\]"):
        layer.forward_recurrent(x[:, 0], x[:, 0], x[:, 0], 3, state)
    with pytest.raises(ValueError, match="start_idx=0 disagrees"):
        layer.forward_chunkwise(x, x, x, start_idx=0, prev_state=state)
    with pytest.raises(TypeError, match="plain tensor: pass seq_idx"):
        layer.forward_recurrent(x[:, 0], x[:, 0], x[:, 0], state.memory)
    with pytest.raises(ValueError, match=r"prev_state must have shape"):
        layer.forward_chunkwise(x, x, x, 4, state.memory[:, :1])
    with pytest.raises(ValueError, match="start_idx must be an int >= 0"):
        layer.forward_chunkwise(x, x, x, start_idx=-1)
    with pytest.raises(TypeError, match="multiple values"):
        layer.forward_chunkwise(x, x, x, state, prev_state=state)


# ------------------------------------------------------------------------------------------------
# The 0.5.1 model API
# ------------------------------------------------------------------------------------------------


def test_051_model_api_forms_states_and_modes():
    with pytest.warns(DeprecationWarning, match="RetNetConfig"):
        net = RetNet(30, d_model=16, nhead=2, num_layers=2, dim_feedforward=32)
    ids = torch.randint(0, 30, (2, 7))
    net.train()
    assert not torch.equal(net.forward_parallel(ids), net.forward_parallel(ids))  # dropout 0.1 is on
    net.eval()
    assert not any(m.training for m in net.model.modules())
    with torch.no_grad():
        y = net.forward_parallel(ids)
        states: list = [None, None]
        for t in range(4):
            out, states = net.forward_recurrent(ids[:, t], t, states)
            torch.testing.assert_close(out, y[:, t], rtol=1e-4, atol=1e-4)
        tail, chunk_states = net.forward_chunkwise(ids[:, 4:], 4, states)
        torch.testing.assert_close(tail, y[:, 4:], rtol=1e-4, atol=1e-4)
        assert all(isinstance(s, torch.Tensor) and s.shape == (2, 2, 8, 8) for s in chunk_states)
        # our RetNetState works too, and must sit at the index
        ours = net.to_retnet()(ids[:, :4], mode="chunkwise")
        assert isinstance(ours.state, RetNetState)
        out, _ = net.forward_recurrent(ids[:, 4], 4, ours.state)
        torch.testing.assert_close(out, y[:, 4], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="seq_idx=5 disagrees"):
            net.forward_recurrent(ids[:, 4], 5, ours.state)
        with pytest.raises(ValueError, match="Expected 2 previous states, got 1"):
            net.forward_chunkwise(ids, 0, [chunk_states[0]])
    loss = net(ids, ids)
    torch.testing.assert_close(loss, F.cross_entropy(y.reshape(-1, 30), ids.reshape(-1)))


def test_051_decoder_and_layer_and_sizes():
    layer = RetNetDecoderLayer(16, 2, dim_feedforward=24, norm_first=False).eval()
    keys = set(layer.state_dict())
    assert {"norm1.weight", "norm2.bias", "linear1.weight", "linear2.bias", "retention.thetas",
            "retention.g_proj.bias"} <= keys and not any("norm_weight" in k for k in keys)
    decoder = RetNetDecoder(layer, 2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = decoder.forward_parallel(x)
        states: list = []
        for t in range(5):
            out, states = decoder.forward_recurrent(x[:, t], t, states)
            torch.testing.assert_close(out, y[:, t], rtol=1e-4, atol=1e-4)
        y2, _ = decoder.forward_chunkwise(x[:, 2:], 2, decoder.forward_chunkwise(x[:, :2], 0)[1])
        torch.testing.assert_close(y2, y[:, 2:], rtol=1e-4, atol=1e-4)
    # retnet_1_3b: 0.5.1's parameter count (every linear with a bias, value width d, no final norm)
    big = retnet_1_3b(1000, device="meta")
    d, f, n, v = 2048, 4096, 24, 1000
    per_layer = 5 * (d * d + d) + 2 * (2 * d) + (d * f + f) + (f * d + d)
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 2 * v * d + v + n * per_layer
