"""`minidiff bench` on a tiny job: every row is measured, ratios and targets are derived."""

import pytest
import torch

from minidiff import generation
from minidiff.apps import bench
from minidiff.runtime import Timing, cpu_bf16_native
from minidiff.unet import PRESETS, UNet, count_macs

SECONDS, WARMUP = 0.25, 0.75  # what every timed call and warm-up "takes" in `result`


def fixed_timed(fn, repeats=1, warmup=None):
    """runtime.timed on a fixed clock: the work runs as it would, and every call takes SECONDS
    (a warm-up WARMUP), so each rate the benchmark derives is known in closed form."""
    if warmup is not None:
        warmup()
    result = None
    for _ in range(repeats):
        result = fn()
    return Timing(SECONDS, WARMUP if warmup is not None else 0.0, result)


@pytest.fixture(scope="module")
def result():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "timed", fixed_timed)
        mp.setattr(generation, "timed", fixed_timed)
        return bench.run_bench(presets=("reduced",), n=4, batch=2, train_batch=4, steps=2,
                               samplers=("ddim", "dpmpp-sde"), log=lambda *_: None)


def test_rows_cover_both_implementations_and_jobs(result):
    jobs = {(r["impl"], r["job"]) for r in result["rows"]}
    assert jobs == {(impl, job) for impl in ("minidiff", "diffusers")
                    for job in ("train", "sample ddim-2", "sample dpmpp-sde-2")}
    peak = round(2 * 2048 ** 3 / SECONDS / 1e9, 1)  # one 2048^2 matmul per SECONDS
    assert result["peak_gflops"] == {"fp32": peak, "bf16": peak if cpu_bf16_native() else None}
    macs = count_macs(UNet(PRESETS["reduced"]))
    for r in result["rows"]:
        assert r["img_per_s"] == 4 / SECONDS  # 4 training images per step, 4 samples per run
        # a training image costs 3 forwards (backward ~ twice the forward), a sample 2 steps
        flops = (3 if r["job"] == "train" else 2) * 2 * r["macs_per_image"] * 4 / SECONDS
        assert r["gflops"] == round(flops / 1e9, 1)
        assert r["peak_fraction"] == round(flops / 1e9 / peak, 3)
        if r["job"] != "train":
            assert r["seconds_per_10k"] == SECONDS * 10000 / 4
            assert r["first_run_extra_s"] == WARMUP - SECONDS
        if r["impl"] == "minidiff":
            assert r["macs_per_image"] == macs and r["vs_diffusers"] == 1.0  # timed alike


def test_anchor_is_diffusers_unet_at_the_same_widths():
    net = bench.DiffusersEps((16, 32, 64))
    assert net.net.config.block_out_channels == (16, 32, 64)
    out = net(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)


def test_report_states_each_target(result):
    md = bench.report(result, "minidiff bench --presets reduced")
    assert "| reduced | minidiff |" in md and "| reduced | diffusers |" in md
    assert "- absolute, 10,000 samples from reduced:" in md
    assert "- peers, reduced train:" in md and "target 2x" in md
    assert md.rstrip().endswith("Command: `minidiff bench --presets reduced`")


def test_emulated_bf16_is_neither_timed_nor_used(monkeypatch):
    """A CPU without native bf16: the peak table says so, nothing is timed in bf16, and asking
    for bf16 explicitly is refused in one line."""
    from minidiff.errors import MinidiffError

    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr("minidiff.runtime.cpu_bf16_native", lambda: False)
    timed = []
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, **_: timed.append(dtype) or 100.0)
    res = bench.run_bench(presets=("reduced",), n=2, batch=2, train_batch=2, steps=1,
                          samplers=("ddim",), anchor=False, log=lambda *_: None)
    assert res["precision"] == "fp32" and res["bf16_native"] is False
    assert res["peak_gflops"] == {"fp32": 100.0, "bf16": None} and timed == [torch.float32]
    assert {r["precision"] for r in res["rows"]} == {"fp32"}
    assert "bf16: emulated, not measured" in bench.report(res, "minidiff bench")
    with pytest.raises(MinidiffError, match="bf16 is emulated"):
        bench.run_bench(presets=("reduced",), precision="bf16", log=lambda *_: None)
