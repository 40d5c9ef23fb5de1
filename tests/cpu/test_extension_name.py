"""ops/cpu/_extension.py: the build's name tells CPUs apart (its code is built with -march=native)."""

from __future__ import annotations

import re

from yet_another_retnet.ops._extension import _cpu_digest

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: avx512f amx_tile\n\n" \
        "processor\t: 1\nvendor_id\t: GenuineIntel\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: avx512f avx512_bf16\n"


def test_the_cpu_digest_tells_machines_apart_and_is_stable() -> None:
    assert re.fullmatch(r"[0-9a-f]{8}", _cpu_digest())
    assert _cpu_digest() == _cpu_digest()
    assert _cpu_digest(INTEL) != _cpu_digest(AMD)
    # only the first processor's vendor, model and flags count
    assert _cpu_digest(INTEL) == _cpu_digest(INTEL.replace("processor\t: 1", "processor\t: 7"))
    assert _cpu_digest(AMD) != _cpu_digest(AMD.replace("avx512_bf16", "avx512_bf16 amx_tile"))
