"""The CPU fast paths' room (``ops/cpu/``): the layout, the pure ``supports`` predicates, the one
switch, the old import paths, the compile notice and ``retnet info --kernels``."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import kernels_expected

from yet_another_retnet.ops.cpu import _build, _extension

#: The checkout (wherever this file sits under tests/).
ROOT = next(d for d in Path(__file__).resolve().parents if (d / "pyproject.toml").is_file())
HAS_TOOLCHAIN = kernels_expected()
#: The previous layout's modules (``yet_another_retnet.ops.<name>``) and predicate names.
OLD_MODULES = ("_build", "_extension", "chunk_kernels", "chunk_scan", "decode_step", "gemv", "matmul", "memory",
               "mlp", "norm_gate", "quantized", "retention_core", "split_heads")
OLD_NAMES = {"chunk_scan": ("chunk_scan_applies", "chunk_scan_kernel_available"),
             "chunk_kernels": ("chunk_kernels_apply", "chunk_retention_applies", "kernel_shapes_fit", "walks_spread"),
             "gemv": ("gemv_kernel_available",), "mlp": ("gelu_mlp_apply",), "norm_gate": ("norm_gate_apply",),
             "retention_core": ("retention_core_applies",), "split_heads": ("split_heads_apply",),
             "_extension": ("load", "is_compiling", "autocast_enabled", "differentiable_grads", "march", "_cpu_digest"),
             "_build": ("build_and_load", "library_path")}


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in (_extension.SWITCH, _extension.DEPRECATED_SWITCH)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**full, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", OLD_MODULES)
def test_an_old_import_path_is_the_new_module(name: str) -> None:
    old = importlib.import_module(f"yet_another_retnet.ops.{name}")
    new = importlib.import_module(f"yet_another_retnet.ops.cpu.{name}")
    assert old is new  # one object: its state (the loaded flag, a patched name) is shared
    for attr in OLD_NAMES.get(name, ()):
        assert callable(getattr(old, attr)), attr


@pytest.mark.parametrize("family", _extension.FAMILIES)
def test_each_family_has_its_predicate_its_source_its_reference_and_its_test(family: str) -> None:
    module = importlib.import_module(f"yet_another_retnet.ops.cpu.{family}")
    assert callable(module.supports)
    assert (_extension.CSRC / f"{family}.cpp").is_file()  # the C++ is named like its module
    doc = module.__doc__ or ""
    assert "Reference" in doc or "reference" in doc
    words = [word.strip("`.,();") for word in doc.split()]
    tests = [w for w in words if w.startswith("tests/") and w.endswith(".py")]
    assert tests and all((ROOT / t).is_file() for t in tests), tests
    assert "2026" not in doc and "/work" not in doc  # no dated figures, no paths outside the repository


SUPPORTS = """
    import os, torch
    from pathlib import Path
    from yet_another_retnet.ops.cpu import (_extension, chunk_kernels, chunk_scan, decode_step, gemv, matmul,
                                            memory, mlp, norm_gate, quantized, retention_core,
                                            split_heads)
    torch.set_num_threads(2)
    r = lambda *shape: torch.randn(*shape)
    tables = (r(2, 1, 32, 32), r(2, 1, 32, 1), r(2, 1, 32, 1), r(2))
    q = r(1, 2, 2, 32, 32)
    with torch.no_grad():
        step = decode_step.supports(r(1, 2 * 2 * 32 + 2 * 64), r(1, 2, 32, 32), None, None, None)
    answers = {
        "gemv": gemv.supports(r(64, 32), r(32)),
        "chunk_scan": chunk_scan.supports(r(1, 2, 3, 16), torch.rand(2)),
        "chunk_kernels": chunk_kernels.supports(q, q, *tables[:2]),
        "chunk_retention": chunk_kernels.supports_chunk_retention(q, q, *tables),
        "norm_gate": norm_gate.supports(r(1, 2, 4, 16), r(1, 4, 32), r(32), r(32)),
        "split_heads": split_heads.supports(r(1, 4, 2 * 2 * 32 + 2 * 64), None),
        "retention_core": retention_core.supports(r(1, 64, 2 * 2 * 32 + 2 * 64), None, 2, 32, 32, *tables),
        "mlp": mlp.supports(r(4, 8).requires_grad_(), r(16, 8), None, r(8, 16), None),
        "matmul": matmul.supports(r(4, 4)),
        "memory": memory.supports(),
        "decode_step": step,
        "quantized": quantized.supports(r(2, 64), torch.zeros(8, 64, dtype=torch.int8)),
    }
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    built = sorted(p.name for p in root.rglob("*")) if root.exists() else []
    print({"answers": answers, "loaded": _extension._loaded, "built": built})
"""


def test_supports_never_builds_the_extension(tmp_path: Path) -> None:
    # A fresh, empty cache: every predicate answers for inputs its kernel takes, and nothing is
    # built, loaded or even looked up.
    done = _run(SUPPORTS, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert done.returncode == 0, done.stderr
    result = eval(done.stdout)
    # Paths whose backward is registered through torch.library.register_autograd need torch >= 2.4.
    autograd = {"chunk_scan", "chunk_kernels", "chunk_retention", "norm_gate", "split_heads", "retention_core"}
    assert result["answers"] == {k: _extension.HAS_REGISTER_AUTOGRAD or k not in autograd for k in result["answers"]}
    assert result["loaded"] is None and result["built"] == []
    assert _extension.COMPILE_NOTICE not in done.stderr


@pytest.mark.parametrize("env", [{"YARETNET_FAST_PATH": "0"}, {"YARETNET_FAST_PATH": "off"},
                                 {"YARETNET_CPU_KERNELS": "0"}])
def test_the_switch_turns_every_kernel_off(env: dict[str, str], tmp_path: Path) -> None:
    done = _run(SUPPORTS + """
    from yet_another_retnet.ops.gemv import gemv
    w, x = torch.randn(9, 7), torch.randn(7)
    assert not _extension.load() and torch.equal(gemv(w, x), torch.mv(w, x))
    with memory.cached_cpu_memory() as active:
        assert not active
    """, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    assert done.returncode == 0, done.stderr
    result = eval(done.stdout)
    assert not any(result["answers"].values()), result["answers"]
    assert result["built"] == []
    deprecated = "YARETNET_CPU_KERNELS is deprecated" in done.stderr
    assert deprecated == ("YARETNET_CPU_KERNELS" in env)  # the old name works, with one warning line


def test_the_new_switch_wins_over_the_deprecated_one_and_bad_values_are_refused(tmp_path: Path) -> None:
    code = "from yet_another_retnet.ops.cpu import _extension; print(_extension.usable())"
    done = _run(code, YARETNET_FAST_PATH="1", YARETNET_CPU_KERNELS="0", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    done = _run(code, YARETNET_FAST_PATH="maybe")
    assert done.returncode != 0 and "YARETNET_FAST_PATH must be 1" in done.stderr


def test_a_build_says_so_on_stderr_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # The compiler is replaced by a copy (what is tested is the notice, not gcc): the first call
    # builds and announces it, the second loads the cached file silently.
    from torch.utils import cpp_extension

    source = tmp_path / "probe.cpp"
    source.write_text("int probe() { return 1; }\n")
    builds = []

    def fake_build(name: str, sources: list[str], build_directory: str, **kwargs: object) -> str:
        builds.append(kwargs["extra_include_paths"])
        out = Path(build_directory) / f"{name}.so"
        out.write_bytes(b"not really a library")
        return str(out)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    first = _build.build_and_load("probe", [source], include_dirs=[tmp_path], notice="compiling the probe...")
    err = capsys.readouterr().err  # (torch 2.2's CUDA wheels also say there is no CUDA runtime)
    assert err.endswith("compiling the probe...\n") and err.count("compiling") == 1 and builds == [[str(tmp_path)]]
    again = _build.build_and_load("probe", [source], include_dirs=[tmp_path], notice="compiling the probe...")
    assert again == first and first.is_file() and capsys.readouterr().err == "" and len(builds) == 1
    header = tmp_path / "probe.h"
    header.write_text("// v1\n")
    assert _build.library_path("probe", [source], [], [], [header]) != first  # headers enter the digest


def _info(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run(f"import sys; from yet_another_retnet.cli import main; sys.exit(main({list(args)!r}))", **env)


def test_info_kernels_says_the_switch_is_off() -> None:
    done = _info("info", "--kernels", "--json", YARETNET_FAST_PATH="0")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["switch"] == "YARETNET_FAST_PATH=0" and not report["extension"]["loaded"]
    assert len(report["paths"]) >= len(_extension.FAMILIES)
    for path in report["paths"]:
        assert not path["taken"] and "YARETNET_FAST_PATH=0" in path["why_not"]
        assert (ROOT / path["test"]).is_file()


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja (the C++ kernels)")
def test_info_kernels_lists_every_path_taken_where_the_kernels_build() -> None:
    assert _extension.load()  # built in this process's cache, which the child shares
    done = _info("info", "--kernels")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "switch: YARETNET_FAST_PATH unset (on)" in text and str(_extension.library) in text
    from yet_another_retnet.ops.cpu.report import FAST_PATHS

    for path in FAST_PATHS:
        taken = _extension.HAS_REGISTER_AUTOGRAD or not path.needs_autograd
        assert f"{path.name}: {'yes' if taken else 'no'}" in text and path.test in text and path.reference in text
    threads = int(re.search(r"(\d+) threads", text).group(1))  # type: ignore[union-attr]
    assert f"a multiple of {threads} or at least {4 * threads}" in text  # the thread-count condition
    done = _info("info", "some-dir", "--kernels")
    assert done.returncode == 2 and "--kernels" in done.stderr
