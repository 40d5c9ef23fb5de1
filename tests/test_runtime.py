"""``runtime.keep_freed_memory``: large freed blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import resource, sys, torch
from yet_another_retnet.runtime import keep_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle():  # a 64 MiB tensor, written and freed: what a long-sequence step does many times
    x = torch.empty(16 * 2**20)
    x.fill_(1.0)
    del x

cycle(); start = faults(); cycle(); before = faults() - start
applied = keep_freed_memory()
cycle(); cycle(); start = faults(); cycle(); after = faults() - start
print(applied, before, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=True)
    applied, before, after = out.stdout.split()
    assert applied == "True"
    assert int(before) > 10_000  # glibc's default: a fresh mmap, ~16k page faults for 64 MiB
    assert int(after) < 100  # kept: the same pages come back


def test_it_can_be_switched_off() -> None:
    env = {"YARETNET_KEEP_FREED_MEMORY": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", "from yet_another_retnet.runtime import keep_freed_memory, "
                          "allocator_env; print(keep_freed_memory(), allocator_env())"],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    assert out.stdout.split() == ["False", "{}"]
