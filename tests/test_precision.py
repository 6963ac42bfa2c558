"""`--precision auto` follows what torch will run: on a CPU without native bf16 no default path
(train, sample, eval, demo, bench, study, serve) computes anything in bf16."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minidiff import runtime
from minidiff.apps import bench
from minidiff.diffusion import DiffusionConfig
from minidiff.settings import TrainConfig
from minidiff.train import train

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


class Bf16Ops(TorchDispatchMode):
    """Records every aten op (in this thread) that produces a bf16 tensor."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
               for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


@pytest.fixture
def no_native_bf16(monkeypatch):
    """This CPU as one without native bf16; yields the bf16 autocasts entered in any thread."""
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: False)  # imported by name
    entered = []
    real = torch.autocast

    class Spy(real):
        def __init__(self, device_type, dtype=None, *args, **kwargs):
            entered.append(dtype)
            super().__init__(device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Spy)
    return entered


def test_imitated_avx2_machine_picks_fp32():
    """The documented imitation switches `--precision auto` in a fresh process, as it switches
    torch itself; this machine without it is reported as it is."""
    code = ("from minidiff.runtime import *; import json; print(json.dumps([cpu_capability(), "
            "cpu_bf16_native(), resolve_precision('auto', resolve_device('cpu'))]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **AVX2_ONLY}, check=True)
    cap, native, prec = json.loads(run.stdout)
    assert cap == "AVX2" and native is False and prec == "fp32"


def test_auto_is_bf16_exactly_where_native(monkeypatch):
    cpu = torch.device("cpu")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_bf16_native", lambda n=native: n)
        assert runtime.resolve_precision("auto", cpu) == want
        assert runtime.resolve_precision("fp32", cpu) == "fp32"  # explicit choices are kept


def test_no_default_path_runs_bf16(no_native_bf16, tiny_cfg, tmp_path, monkeypatch):
    from minidiff.apps import demo, serve
    from minidiff.apps.cli import main
    from minidiff.generation import sample_to_file
    from minidiff.metrics import MIN_SAMPLES
    from minidiff.settings import SamplingConfig
    from minidiff.study import PRESETS, Study

    run = tmp_path / "run"
    watch = Bf16Ops()
    with watch:
        # train, sample, eval --model
        train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=2, batch_size=4, subset=8,
                                                       warmup_steps=1), run, progress=False)
        meta = sample_to_file(run, tmp_path / "s.npz", SamplingConfig(steps=2), n=2,
                              progress=False)
        assert main(["eval", "--model", str(run), "--time-n", "2", "--steps", "2"]) == 0
        # demo (a few steps, few sampling steps)
        monkeypatch.setattr(demo, "DEMO_SAMPLING", SamplingConfig(steps=2))
        monkeypatch.setattr(demo, "DEMO_TRAIN", replace(demo.DEMO_TRAIN, subset=64,
                                                        batch_size=8, warmup_steps=1))
        demo.run_demo(tmp_path / "demo", steps=2, n=MIN_SAMPLES)
        # bench
        res = bench.run_bench(presets=("reduced",), n=2, batch=2, train_batch=2, steps=1,
                              samplers=("ddim",), anchor=False, log=lambda *_: None)
        # study: a training stage and an evaluation stage
        study = Study(replace(PRESETS["smoke"], subset=16, n=MIN_SAMPLES,
                              sampling=SamplingConfig(steps=1)),
                      tmp_path / "study", progress=False, log=lambda *_: None)
        row = study.evaluate("tiny", study.train("t", "reduced", epochs=0.5, lr=1e-3))
        # serve: one request to a shipped model, in this thread
        pool = serve.ModelPool(max_seconds=60)
        ask = serve.GenerateRequest.parse({"model": "reduced", "n": 1, "steps": 1}, pool.info)
        reply = pool.run(ask)
    assert watch.ops == [] and torch.bfloat16 not in no_native_bf16
    assert meta["precision"] == "fp32" and res["precision"] == "fp32"
    assert row["compute_dtype"] == "fp32" and (reply["n"], reply["steps"]) == (1, 1)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "fp32" in report and "no native bf16" in report  # and says it trains fewer steps


def test_default_sampling_batch_follows_the_precision(monkeypatch):
    """The batch left to the default is the fastest measured for the precision auto picks; one
    the user gives is kept."""
    from dataclasses import asdict

    from minidiff.generation import resolve_sampling
    from minidiff.settings import BATCH_BY_PRECISION, SamplingConfig

    config = {"diffusion": asdict(DiffusionConfig())}
    cpu = torch.device("cpu")
    for native, prec in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_bf16_native", lambda n=native: n)
        cfg, _ = resolve_sampling(SamplingConfig(), config, cpu)
        assert (cfg.precision, cfg.batch_size) == (prec, BATCH_BY_PRECISION[prec])
        assert resolve_sampling(SamplingConfig(batch_size=7), config, cpu)[0].batch_size == 7
    assert BATCH_BY_PRECISION == {"bf16": 256, "fp32": 128}


def test_environment_line_names_the_cpu_class_and_reads_older_records():
    from minidiff.runtime import environment, environment_line

    env = environment()
    line = environment_line(env)
    assert env["cpu_capability"] in line and "bf16 " in line and f"{env['threads']} threads" in line
    if env["cpu_model"]:  # Linux: family and model, which tell a Zen 3 from a Zen 4
        assert env["cpu_model"].startswith("family ") and env["cpu_model"] in line
    old = {"date": "2026-11-27", "cpu": "AMD EPYC", "threads": 2}  # a record before the class
    assert environment_line(old) == "2026-11-27, AMD EPYC, 2 threads"
