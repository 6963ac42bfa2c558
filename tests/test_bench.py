"""`minidiff bench` on a tiny job: every row is measured, ratios and targets are derived."""

import pytest
import torch

from minidiff.apps import bench


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(presets=("reduced",), n=4, batch=2, train_batch=4, steps=2,
                           samplers=("ddim", "dpmpp-sde"), log=lambda *_: None)


def test_rows_cover_both_implementations_and_jobs(result):
    jobs = {(r["impl"], r["job"]) for r in result["rows"]}
    assert jobs == {(impl, job) for impl in ("minidiff", "diffusers")
                    for job in ("train", "sample ddim-2", "sample dpmpp-sde-2")}
    for r in result["rows"]:
        assert r["img_per_s"] > 0 and r["macs_per_image"] > 0
        # against the peak of the precision the row ran in, never an emulated one
        peak = result["peak_gflops"][r["precision"]]
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak, abs=1e-3)
        if r["impl"] == "minidiff":
            peer = next(p for p in result["rows"] if p["impl"] == "diffusers"
                        and p["job"] == r["job"])
            assert r["vs_diffusers"] == pytest.approx(r["img_per_s"] / peer["img_per_s"],
                                                      abs=0.01)


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
