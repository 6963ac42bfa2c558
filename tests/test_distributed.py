"""Data-parallel training: 2 CPU processes under torchrun (gloo) == 1 process, same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minidiff.distributed import World, check_batch
from minidiff.errors import MinidiffError
from minidiff.unet import PRESETS, UNet, UNetConfig

ARGS = ["train", "--preset", "reduced", "--channels", "8,16", "--steps", "6", "--batch-size",
        "16", "--subset", "64", "--precision", "fp32", "--device", "cpu", "--no-progress",
        "--lr", "0.01"]


def test_shards_partition_the_global_batch():
    rows = [list(range(12))[World(r, 3).shard(12)] for r in range(3)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert World().shard(12) == slice(0, 12)


def test_global_batch_must_divide_among_processes():
    check_batch(World(0, 2), 16)
    with pytest.raises(MinidiffError, match="divisible by the 2 processes"):
        check_batch(World(0, 2), 15)


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "minidiff", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "minidiff", *ARGS,
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    # rank 0 alone reports and logs
    assert [json.loads(ln)["out"] for ln in two.stdout.splitlines() if ln.startswith("{")] == [
        str(tmp_path / "two")]
    logs = [json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("one", "two")]
    # the logged loss is the mean over both shards: the single process's loss up to rounding
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], abs=1e-5)
    # Adam turns float-rounding differences in near-zero gradients into steps of up to lr, so
    # compare the whole update: 2 processes land within 5% of the distance 1 process moved
    # (measured: 0.3%; rank 0 training on its half alone lands ~57% away).
    torch.manual_seed(0)  # the init train() draws with seed 0
    init = UNet(UNetConfig(**{**PRESETS["reduced"].to_dict(), "channels": (8, 16)})).state_dict()
    ckpt = "checkpoints/step-00000006/state.safetensors"
    one, two = ({k[6:]: v for k, v in load_file(tmp_path / r / ckpt).items()
                 if k.startswith("model.")} for r in ("one", "two"))
    assert one.keys() == two.keys() == init.keys()

    def norm(d):
        return sum(v.float().pow(2).sum() for v in d.values()).sqrt().item()

    moved = norm({k: one[k] - init[k] for k in init})
    assert moved > 0.1
    assert norm({k: two[k] - one[k] for k in init}) < 0.05 * moved
