"""Crash safety: SIGKILL + resume, corrupt checkpoints, full disks, hostile files."""

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minidiff import files as mio
from minidiff.apps.cli import main

# A tiny model trained on 64 images: each step takes milliseconds, so a run of 200 steps that
# checkpoints every step spends most of its time writing files -- where a kill hurts most.
TINY_ARGS = ["--preset", "reduced", "--channels", "8,16", "--batch-size", "16", "--subset", "64",
             "--precision", "fp32", "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "minidiff", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_checkpoint(out: Path, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list((out / "checkpoints").glob("step-*")) or proc.poll() is not None:
            return
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    args = ["train", *TINY_ARGS, "--steps", "150", "--checkpoint-every", "1",
            "--keep-checkpoints", "2"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))  # beside the cut runs: one thread each

    out = tmp_path / "cut"
    rng = random.Random(0)
    killed = 0
    proc = cli(*args, "--out", str(out))
    for _ in range(4):
        wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
        proc = cli(*args, "--out", str(out), "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert killed >= 2, "the runs finished before they could be killed; raise --steps"
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" /
                                                         "model.safetensors").read_bytes()
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*"))
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # --keep-checkpoints


def _train(out, *extra):
    return main(["train", *TINY_ARGS, "--out", str(out), *extra])


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
    assert _train(tmp_path / "ref", "--steps", "30", "--checkpoint-every", "10") == 0
    out = tmp_path / "r"
    assert _train(out, "--steps", "30", "--checkpoint-every", "10") == 0
    newest = out / "checkpoints" / "step-00000030" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert _train(out, "--resume") == 0
    assert "skipping corrupt checkpoint step-00000030" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" /
                                                         "model.safetensors").read_bytes()


def test_full_disk_during_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync_fails_later(fd):
        calls["n"] += 1
        if calls["n"] > 8:  # the first checkpoint (step 5) goes through, the next does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(mio.os, "fsync", fsync_fails_later)
    assert _train(out, "--steps", "20", "--checkpoint-every", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    monkeypatch.setattr(mio.os, "fsync", real_fsync)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000005"]
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob(".*"))
    assert main(["sample", str(out), "--n", "2", "--steps", "3", "--no-progress",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert _train(out, "--resume") == 0  # and the run goes on


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.safetensors", "evil.npz"])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    assert pickle.loads(payload) and marker.exists()  # the payload does work when unpickled
    marker.unlink()
    f = tmp_path / name
    f.write_bytes(payload)
    if name.endswith(".npz"):
        np.savez(f, images=np.array([_Evil(marker)], dtype=object))
        rc = main(["grid", str(f), "--out", str(tmp_path / "g.png")])
    else:
        rc = main(["sample", str(f), "--out", str(tmp_path / "s.npz")])
    assert rc == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("pickled" in err or "not a valid safetensors" in err
                                     or "not a readable .npz" in err), err


def test_absurd_learning_rate_stops_with_step_and_cause(tmp_path, capsys):
    out = tmp_path / "r"
    rc = _train(out, "--steps", "200", "--checkpoint-every", "1", "--lr", "1e30")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "training diverged at step" in err[0] and "lower --lr" in err[0]
    step = int(err[0].split("at step ")[1].split(":")[0])
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1] == f"step-{step:08d}"  # the last good state is on disk
    assert json.loads((out / "config.json").read_text())["step"] == step


@pytest.mark.parametrize("arr,needle", [
    (np.zeros((3, 28, 28), dtype=np.float32), "images are float32, expected uint8"),
    (np.full((3, 28, 28), np.nan, dtype=np.float32), "contain NaN or Inf"),
    (np.zeros((3, 32, 32), dtype=np.uint8), "shape [3, 32, 32], expected [N x 28 x 28]"),
    (np.zeros((0, 28, 28), dtype=np.uint8), "with N >= 1"),
])
def test_bad_sample_files_are_named(tmp_path, capsys, arr, needle):
    f = tmp_path / "s.npz"
    np.savez(f, images=arr)
    assert main(["grid", str(f), "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "g.png").exists()


def test_sample_files_are_deflated_npz_that_numpy_and_minidiff_read_back(tmp_path):
    from minidiff.samplefiles import load_labels, load_samples, save_samples
    rng = np.random.default_rng(0)
    images = (rng.random((50, 28, 28)) < 0.2).astype(np.uint8) * 255
    labels = rng.integers(0, 10, 50)
    f = tmp_path / "s.npz"
    save_samples(f, images, {"dataset": "mnist"}, labels=labels)
    with np.load(f, allow_pickle=False) as npz:  # numpy's own reader, as any user opens it
        assert np.array_equal(npz["images"], images) and np.array_equal(npz["labels"], labels)
    assert np.array_equal(load_samples(f), images) and np.array_equal(load_labels(f, 50), labels)
    with zipfile.ZipFile(f) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    assert f.stat().st_size < images.nbytes / 2
