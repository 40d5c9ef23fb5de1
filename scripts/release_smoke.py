"""The release check's smoke test, run by scripts/release-check.sh inside a virtual environment
holding the built wheel: the public API, the 0.5.1 API and the CLI, from the installed wheel.

Usage: python release_smoke.py PREFIX KERNELS   (PREFIX: the environment the package must come
from; KERNELS: 1 if the C++ kernels must load, 0 if they must fall back to plain PyTorch).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    prefix, want_kernels = Path(sys.argv[1]).resolve(), sys.argv[2] == "1"
    import yet_another_retnet as pkg

    where = Path(pkg.__file__).resolve()
    assert prefix in where.parents, f"yet_another_retnet imported from {where}, not from the wheel in {prefix}"
    from yet_another_retnet import RetNet, RetNetConfig
    from yet_another_retnet.ops._extension import load
    from yet_another_retnet.retention import (
        MultiheadRetention,
        retention_parallel,
        retention_recurrent,
    )

    kernels = load()
    assert kernels == want_kernels, f"C++ kernels loaded: {kernels}, expected {want_kernels}"

    torch.manual_seed(0)
    q = k = v = torch.randn(1, 2, 12, 8)
    y, _ = retention_parallel(q, k, v)
    state, steps = None, []
    for i in range(12):
        out, state = retention_recurrent(q[:, :, i], k[:, :, i], v[:, :, i], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, dim=2), y)
    mhr = MultiheadRetention(embed_dim=16, num_heads=2)
    x = torch.randn(1, 6, 16)
    torch.testing.assert_close(mhr.forward_chunkwise(x, x, x, chunk_size=4)[0], mhr.forward_parallel(x, x, x)[0])

    model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2)).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(ids, mode="parallel").logits
        for mode in ("chunkwise", "recurrent"):
            torch.testing.assert_close(model(ids, mode=mode, chunk_size=16).logits, ref, rtol=1e-4, atol=1e-4)
    new = model.generate(ids[:, :5], max_new_tokens=6)
    assert new.shape == (2, 11), new.shape

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from yet_another_retnet.retnet import RetNet as RetNet051

        old = RetNet051(50, d_model=16, nhead=2, num_layers=1).eval()
    with torch.no_grad():
        logits, _ = old.forward_recurrent(ids[:, 0] % 50, 0, [])
        torch.testing.assert_close(logits, old.forward_parallel(ids[:, :1] % 50)[:, 0], rtol=1e-4, atol=1e-4)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        torch.testing.assert_close(RetNet.from_pretrained(Path(tmp) / "m").eval()(ids).logits, model(ids).logits)
        torch.save(old.state_dict(), Path(tmp) / "old.pt")
        retnet = [str(Path(sys.executable).with_name("retnet"))]
        for args in (["--version"], ["info", "--preset", "tiny"], ["info", str(Path(tmp) / "m")],
                     ["convert", "--from", "yar051", str(Path(tmp) / "old.pt"), str(Path(tmp) / "c")]):
            done = subprocess.run(retnet + args, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"retnet {' '.join(args)}: {done.returncode}\n{done.stderr[-2000:]}"
        done = subprocess.run([*retnet, "info", str(Path(tmp) / "missing")], capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    print(f"smoke test passed: yet-another-retnet {pkg.__version__} from {where.parent}, C++ kernels {kernels}")


if __name__ == "__main__":
    main()
