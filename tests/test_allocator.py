"""The command line keeps freed memory for the next allocation (glibc), so a forward pass's
activations stop costing page faults; a user's own allocator settings are left alone."""

import os
import platform
import subprocess
import sys

import pytest

from minidiff.apps.cli import main
from minidiff.runtime import environment

# Five forward passes of the `reduced` U-Net after a warm-up, under glibc's defaults and then
# with freed memory kept, in one process; prints whether the setting took and the page faults of
# each five.
LOOP = """
import resource
import torch
from minidiff.allocator import keep_freed_memory
from minidiff.unet import PRESETS, UNet
net, x, t = UNet(PRESETS["reduced"]).eval(), torch.randn(64, 1, 28, 28), torch.full((64,), 500)


def faults():
    with torch.inference_mode():
        net(x, t)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            net(x, t)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


plain = faults()
kept = keep_freed_memory()
faults()  # the heap grows to the passes' peak once
print(kept, plain, faults())
"""


def untuned(**env) -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | env


def run_loop() -> tuple[bool, int, int]:
    kept, plain, faults = subprocess.run([sys.executable, "-c", LOOP], capture_output=True,
                                         text=True, env=untuned(), check=True).stdout.split()
    return kept == "True", int(plain), int(faults)


def kept_under(**env) -> bool:
    code = "from minidiff.allocator import keep_freed_memory; print(keep_freed_memory())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=untuned(**env), check=True).stdout.strip() == "True"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_memory_ends_the_page_faults_of_forward_passes():
    kept, plain_faults, faults = run_loop()
    assert kept
    # Under glibc's defaults the activations came back from the kernel as fresh pages:
    # 29,632-77,232 faults on a Zen 3 (transparent huge pages "madvise"; "always" makes fewer);
    # kept, the passes reuse the heap: 0-1,764 there.
    assert faults < max(plain_faults / 10, 1_000)
    assert plain_faults > faults


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
