"""The command line keeps freed memory for the next allocation (glibc), so a forward pass's
activations stop costing page faults; a user's own allocator settings are left alone."""

import os
import platform
import subprocess
import sys

import pytest

from minidiff.apps.cli import main
from minidiff.runtime import environment

# Five forward passes of the `reduced` U-Net after a warm-up one; prints whether the setting
# holds and the page faults of the five.
LOOP = """
import resource, sys
from minidiff.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
from minidiff.unet import PRESETS, UNet
net, x, t = UNet(PRESETS["reduced"]).eval(), torch.randn(64, 1, 28, 28), torch.full((64,), 500)
with torch.inference_mode():
    net(x, t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x, t)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def untuned(**env) -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | env


def run_loop(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                         env=untuned(), check=True).stdout.split()
    return out[0] == "True", int(out[1])


def kept_under(**env) -> bool:
    code = "from minidiff.allocator import keep_freed_memory; print(keep_freed_memory())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=untuned(**env), check=True).stdout.strip() == "True"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_memory_ends_the_page_faults_of_forward_passes():
    kept, faults = run_loop("keep")
    plain_kept, plain_faults = run_loop("plain")
    assert kept and not plain_kept
    assert plain_faults > 10_000  # the activations came back from the kernel as fresh pages
    assert faults < plain_faults / 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_tuned_allocator_is_left_alone():
    assert kept_under()
    assert not kept_under(MALLOC_ARENA_MAX="2")
    assert not kept_under(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
    assert not kept_under(LD_PRELOAD="")


def test_the_command_line_keeps_freed_memory(monkeypatch, capsys):
    """`minidiff` sets it before a command runs; timings record it."""
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES",
                                                                         "LD_PRELOAD")]:
        monkeypatch.delenv(k)
    assert main(["data", "list"]) == 0
    assert environment()["malloc_kept"] == (platform.libc_ver()[0] == "glibc")
