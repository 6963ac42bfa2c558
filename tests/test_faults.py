"""Faults a user's data must survive: a disk that fills half-way through a write, a read-only
folder, a second writer, damaged and hostile input files. Each ends in one line
`minidiff: error: ...` and a non-zero status, and what was on disk before is intact and loads.
Nothing is allocated from a file's header before its size is checked against the file."""

import contextlib
import copy
import errno
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff.apps.demo as demo_mod
from minidiff import data as mdata
from minidiff import files as mio
from minidiff.apps.cli import main
from minidiff.checkpoint import load_checkpoint, load_state
from minidiff.compress import prune_checkpoint
from minidiff.errors import MinidiffError
from minidiff.files import run_lock
from minidiff.samplefiles import load_samples

SAMPLE = ["--n", "2", "--steps", "2", "--no-progress"]
TINY = ["--preset", "reduced", "--channels", "8,16", "--batch-size", "8", "--subset", "16",
        "--precision", "fp32", "--no-progress"]


def fails(capsys, *argv) -> str:
    """Run the CLI; it must fail with one line `minidiff: error: ...`, which is returned."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc not in (0, None) and len(err) == 1 and err[0].startswith("minidiff: error: "), \
        (rc, err)
    return err[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: what must be unchanged after a failure (a
    lock file holds only its last holder's pid)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != mio.LOCK_FILE}


@contextlib.contextmanager
def other_process_holds(folder: Path):
    """Another process holds ``folder``'s run lock for the duration; yields its pid."""
    code = ("import sys\nfrom minidiff.files import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait(timeout=30)


class _HalfWritten:
    """A file whose disk fills half-way through the first write."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_fills(monkeypatch, when) -> list[str]:
    """Writes of :func:`minidiff.files.atomic_write_bytes` to a file for whose name ``when``
    holds stop half-way with ENOSPC (the name is that of the final file, not its temp file);
    returns the names seen."""
    real, seen = os.fdopen, []

    def fdopen(fd, *args, **kw):
        f = real(fd, *args, **kw)
        temp = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # .<name>.<random>.tmp
        if temp.endswith(".tmp") and temp.startswith("."):
            name = temp[1:].rsplit(".", 2)[0]
            seen.append(name)
            if when(name):
                return _HalfWritten(f)
        return f

    monkeypatch.setattr(mio.os, "fdopen", fdopen)
    return seen


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run folder."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


# --------------------------------------------------------------------------- locks


def test_run_lock_excludes_another_process_and_is_reentrant_in_one(tmp_path):
    with run_lock(tmp_path / "r"):
        with run_lock(tmp_path / "r"):  # the demo holds it and trains into the same folder
            pass
        code = "import sys\nfrom minidiff.files import run_lock\nwith run_lock(sys.argv[1]): pass"
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")],
                           capture_output=True, text=True)
        assert p.returncode == 1 and f"in use by process {os.getpid()}" in p.stderr
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")])
    assert p.returncode == 0  # released


def test_a_second_demo_on_one_folder_stops_at_once(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("the demo trained in a folder another process holds")

    monkeypatch.setattr(demo_mod, "train", no_training)
    out = tmp_path / "demo"
    with other_process_holds(out) as pid:
        err = fails(capsys, "demo", "--out", out, "--steps", "1")
    assert err == (f"minidiff: error: {out} is in use by process {pid}; wait for it to finish "
                   "(or stop it) and run the command again")
    assert [p.name for p in out.iterdir()] == [".lock"]


class _Stop(MinidiffError):
    pass


def test_demo_force_removes_only_the_demos_own_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"train": {"steps": 7}}))
    (out / "report.md").write_text("an old demo report")
    (out / "notes.txt").write_text("the user's")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(b"\x00\x01")
    seen = []

    def train(*a, **k):  # what the demo trains into, then stop: the test is the folder
        seen.append(sorted(p.name for p in out.iterdir()))
        raise _Stop("stopped by the test")

    monkeypatch.setattr(demo_mod, "train", train)
    assert "holds a demo run of another recipe" in fails(capsys, "demo", "--out", out)
    assert fails(capsys, "demo", "--out", out, "--force").endswith("stopped by the test")
    assert seen == [[".lock", "mine", "notes.txt"]]
    assert (out / "notes.txt").read_text() == "the user's"
    assert (out / "mine" / "data.bin").read_bytes() == b"\x00\x01"


def test_demo_does_not_write_over_files_of_its_names_that_are_no_demo_run(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(demo_mod, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "d"
    out.mkdir()
    (out / "report.md").write_text("the user's report")
    err = fails(capsys, "demo", "--out", out)
    assert err == (f"minidiff: error: {out} holds report.md but no demo run; pass --force to "
                   "replace them or choose another --out")
    assert (out / "report.md").read_text() == "the user's report"


# --------------------------------------------------------------------------- overwrites


def test_outputs_that_exist_are_replaced_only_with_force(run, tmp_path, capsys):
    s, g = tmp_path / "s.npz", tmp_path / "g.png"
    assert main(["sample", str(run), *SAMPLE, "--out", str(s), "--grid", str(g)]) == 0
    capsys.readouterr()
    weights = tmp_path / "classifier-mnist.safetensors"
    weights.write_bytes(b"the user's")
    before = snapshot(tmp_path)
    for argv, path in ((["sample", run, *SAMPLE, "--out", s], s),
                       (["sample", run, *SAMPLE, "--out", tmp_path / "t.npz", "--grid", g], g),
                       (["grid", s, "--out", g], g),
                       (["eval", s, "--json", s], s),
                       (["classifier", "evaluate", "--json", g], g),
                       (["classifier", "train", "--out", tmp_path], weights)):
        err = fails(capsys, *argv)
        assert f"{path} already " in err and "pass --force to replace it" in err, err
    # a run folder is more than a model: not even --force replaces it
    for force in ((), ("--force",)):
        err = fails(capsys, "quantize", run, "--out", run, *force)
        assert err.endswith(f"{run} holds more than a model (model.safetensors, config.json); "
                            "choose another --out"), err
    s.with_suffix(".json").rename(tmp_path / "t.json")  # a sidecar alone is the user's too
    err = fails(capsys, "sample", run, *SAMPLE, "--out", tmp_path / "t.npz")
    assert f"{tmp_path / 't.json'} already exists" in err
    (tmp_path / "t.json").rename(s.with_suffix(".json"))
    assert snapshot(tmp_path) == before
    assert main(["grid", str(s), "--out", str(g), "--force"]) == 0
    assert main(["sample", str(run), *SAMPLE, "--seed", "1", "--out", str(s), "--force"]) == 0
    assert json.loads(s.with_suffix(".json").read_text())["seed"] == 1


def test_prune_and_quantize_write_a_folder_beside_and_swap_it_in(run, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--out", str(q)]) == 0
    assert main(["quantize", str(run), "--mode", "fp16", "--out", str(q), "--force"]) == 0
    assert load_checkpoint(q)[1]["quantized"]["mode"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]  # nothing left beside
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("x")
    for force in ((), ("--force",)):  # a folder of the user's things is never replaced
        err = fails(capsys, "prune", run, "--unstructured", "0.3", "--out", tmp_path / "user",
                    *force)
        assert err.endswith("user holds more than a model (model.safetensors, config.json); "
                            "choose another --out"), err
    assert (tmp_path / "user" / "notes.txt").read_text() == "x"
    err = fails(capsys, "quantize", run, "--out", ".", "--force")
    assert err.endswith("--out .: name a folder to create, e.g. --out runs/model"), err


def test_a_swap_stopped_half_way_is_undone_and_its_leftover_recovered(run, tmp_path,
                                                                      monkeypatch, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--out", str(q)]) == 0
    good = snapshot(q)
    real, calls = os.replace, []

    def new_copy_fails_to_go_in(src, dst):  # (os.replace also renames each file written)
        if Path(dst).parent == tmp_path:
            calls.append(Path(dst).name)
            if Path(src).name.startswith(".q.new-"):
                raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr("minidiff.compress.os.replace", new_copy_fails_to_go_in)
    assert "Input/output error" in fails(capsys, "quantize", run, "--mode", "fp16", "--out", q,
                                         "--force")
    assert calls[0].startswith(".q.old-") and calls[1:] == ["q", "q"]  # tried, put back
    assert snapshot(q) == good and load_checkpoint(q)
    # a crash between the two renames leaves only the old copy beside the name: it comes back
    monkeypatch.setattr("minidiff.compress.os.replace", real)
    os.replace(q, tmp_path / ".q.old-99999")
    err = fails(capsys, "quantize", run, "--out", q)
    assert "q already holds a model; pass --force" in err
    assert snapshot(q) == good and not list(tmp_path.glob(".q.*"))


# --------------------------------------------------------------------------- full disk


def test_full_disk_half_way_through_a_model_write_keeps_the_old_one(run, tmp_path, monkeypatch,
                                                                    capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--out", str(q)]) == 0
    good = snapshot(q)
    seen = disk_fills(monkeypatch, lambda name: name == "model.safetensors")
    err = fails(capsys, "quantize", run, "--mode", "fp16", "--out", q, "--force")
    assert "model.safetensors: No space left on device; free some disk space" in err
    assert seen == ["model.safetensors"]
    err = fails(capsys, "prune", run, "--unstructured", "0.3", "--out", tmp_path / "p")
    assert "No space left on device" in err
    assert snapshot(q) == good and load_checkpoint(q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]


def test_full_disk_half_way_through_a_training_checkpoint_keeps_the_last_one(tmp_path,
                                                                           monkeypatch, capsys):
    out = tmp_path / "r"
    writes = []

    def second_state(name):
        writes.append(name)
        return name == "state.safetensors" and writes.count(name) == 2

    disk_fills(monkeypatch, second_state)
    assert "No space left on device" in fails(capsys, "train", *TINY, "--steps", "4",
                                              "--checkpoint-every", "2", "--out", out)
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    model = load_checkpoint(out)[0]
    opt = torch.optim.AdamW(model.parameters())
    assert load_state(out, model, copy.deepcopy(model), opt)["step"] == 2
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 4


@pytest.mark.parametrize("which", ["samples", "sidecar"])
def test_full_disk_while_writing_samples_keeps_the_old_pair(run, tmp_path, monkeypatch, capsys,
                                                            which):
    s = tmp_path / "s.npz"
    assert main(["sample", str(run), *SAMPLE, "--out", str(s)]) == 0
    before = snapshot(tmp_path)
    target = ".s.npz.new" if which == "samples" else "s.json"
    seen = disk_fills(monkeypatch, lambda name: name == target)
    assert "No space left on device" in fails(capsys, "sample", run, *SAMPLE, "--seed", "3",
                                              "--out", s, "--force")
    assert target in seen
    assert snapshot(tmp_path) == before  # neither half of the pair was replaced
    assert load_samples(s).shape == (2, 28, 28)


def test_a_read_only_output_folder_is_named(run, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is not available")
    else:
        ro.chmod(0o555)
    try:
        for argv in (["sample", run, *SAMPLE, "--out", ro / "s.npz"],
                     ["quantize", run, "--out", ro / "q"]):
            err = fails(capsys, *argv)
            assert f"{ro}" in err and err.endswith("check the path and its permissions"), err
        assert not list(ro.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)


# --------------------------------------------------------------------------- model folders


def _edit_config(folder: Path, edit, keep_sha: bool = False) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    if not keep_sha:
        cfg.pop("model_sha256")
    (folder / "config.json").write_text(json.dumps(edit(cfg)))


def _model(cfg: dict, **changes) -> dict:
    return {**cfg, "model": {**cfg["model"], **changes}}


@pytest.mark.parametrize("damage, needle", [
    (lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:999]),
     "does not match the"),
    (lambda r: ((r / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
                _edit_config(r, lambda c: c)), "not a valid safetensors file"),
    (lambda r: (r / "config.json").write_text('{"model": {"chan'), "unreadable JSON"),
    (lambda r: (r / "config.json").write_text("[1, 2]"), "(a JSON list, not an object)"),
    (lambda r: (r / "model.safetensors").unlink(), "no model.safetensors in this folder"),
    (lambda r: _edit_config(r, lambda c: _model(c, num_classes=10)),
     "missing ['class_emb.weight']"),
    # widths no file could hold: checked on the meta device before anything is allocated
    (lambda r: _edit_config(r, lambda c: _model(c, channels=[8, 1 << 20])),
     "shape of down_blocks.1.conv1.weight is [16, 8, 3, 3], config implies [1048576, 8, 3, 3]"),
    (lambda r: _edit_config(r, lambda c: {k: v for k, v in c.items() if k != "diffusion"}),
     "invalid config ('diffusion')"),
])
def test_truncated_and_inconsistent_model_folders_are_named(run, tmp_path, capsys, damage,
                                                           needle):
    damage(run)
    before = snapshot(run)
    err = fails(capsys, "sample", run, *SAMPLE, "--out", tmp_path / "s.npz")
    assert needle in err, err
    assert snapshot(run) == before and not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("widths", [False, True])
def test_a_sparse_mask_that_disagrees_with_the_config_is_refused(run, tmp_path, capsys, widths):
    """A bitmask must hold one bit per weight of the shape the config implies: otherwise a
    config claiming huge widths would make decoding allocate them."""
    p = tmp_path / "p"
    prune_checkpoint(run, p, unstructured=0.3)
    if widths:
        _edit_config(p, lambda c: _model(c, channels=[8, 1 << 20]))
    else:
        tensors = load_file(p / "model.safetensors")
        key = next(k for k in tensors if k.endswith(":mask"))
        tensors[key] = tensors[key][:-1].clone()
        save_file(tensors, p / "model.safetensors", metadata={"format": "pt"})
        _edit_config(p, lambda c: c)
    err = fails(capsys, "sample", p, *SAMPLE, "--out", tmp_path / "s.npz")
    assert "has a mask of" in err and "needs" in err, err


# --------------------------------------------------------------------------- sample files


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npy_header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _saved(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


HOSTILE = {
    "float": (lambda f: _saved(f, images=np.zeros((2, 28, 28))), "images are float64"),
    "shape": (lambda f: _saved(f, images=np.zeros((2, 3, 28, 28), np.uint8)),
              "images have shape [2, 3, 28, 28]"),
    "strings": (lambda f: _saved(f, images=np.full((2, 28, 28), "x")), "images are <U1"),
    "objects": (lambda f: _saved(f, images=np.array([{"a": 1}, None], dtype=object)),
                "'images' holds Python objects, which are never unpickled"),
    "pickle": (lambda f: f.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."),
               "not a readable .npz (File is not a zip file)"),
    "npy": (lambda f: f.write_bytes(_npy_header((2, 28, 28)) + bytes(1568)),
            "not a readable .npz (File is not a zip file)"),
    # 784 GB declared, 100 bytes held: refused from the header, nothing that size allocated
    "huge": (lambda f: _npz(f, {"images.npy": _npy_header((10**9, 28, 28)) + b"\0" * 100}),
             "'images' declares shape [1000000000, 28, 28] (784,000,000,000 bytes) but the file "
             "holds 100"),
    "huge-float": (lambda f: _npz(f, {"images.npy": _npy_header((2**40, 28, 28), "<f8")}),
                   "but the file holds 0"),
    "no-images": (lambda f: _saved(f, pictures=np.zeros((2, 28, 28), np.uint8)),
                  "no 'images' array (found ['pictures'])"),
    "labels-huge": (lambda f: _npz(f, {"images.npy": _npy_header((2, 28, 28)) + bytes(1568),
                                       "labels.npy": _npy_header((10**12,), "<i8")}),
                    "'labels' must be 2 class ids in 0..9 (got shape [1000000000000], dtype "
                    "int64)"),
    "labels-empty": (lambda f: _npz(f, {"images.npy": _npy_header((2, 28, 28)) + bytes(1568),
                                        "labels.npy": _npy_header((2,), "<i8")}),
                     "'labels' declares shape [2] (16 bytes) but the file holds 0"),
    "labels-objects": (lambda f: _saved(f, images=np.zeros((2, 28, 28), np.uint8),
                                        labels=np.array([None, 1], dtype=object)),
                       "'labels' holds Python objects"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sample_files_are_named_and_nothing_is_replaced(tmp_path, capsys, case):
    make, needle = HOSTILE[case]
    f = tmp_path / "s.npz"
    make(f)
    g = tmp_path / "g.png"
    g.write_bytes(b"the previous grid")
    command = "eval" if case.startswith("labels") else "grid"  # eval reads the labels too
    argv = [command, f] + (["--out", g, "--force"] if command == "grid" else [])
    err = fails(capsys, *argv)
    assert needle in err, err
    assert g.read_bytes() == b"the previous grid"


# --------------------------------------------------------------------------- IDX files


def _gzip_stream(head: bytes, zeros: int) -> bytes:
    """gzip of ``head`` and then ``zeros`` zero bytes, built without holding them."""
    z = zlib.compressobj(wbits=31)
    out = [z.compress(head)]
    chunk = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(z.compress(chunk))
    return b"".join(out) + z.flush()


def _mnist_copy(tmp_path: Path) -> Path:
    d = tmp_path / "mnist"
    shutil.copytree(mdata.find_dataset("mnist"), d)
    return d


def test_an_idx_header_claiming_billions_is_refused_in_one_line(tmp_path, capsys):
    d = _mnist_copy(tmp_path)
    labels = d / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(struct.pack(">II", mdata.LABELS_MAGIC, 3_000_000_000)
                                     + bytes(100)))
    err = fails(capsys, "train", *TINY, "--steps", "1", "--data-dir", d, "--out",
                tmp_path / "o")
    assert err.endswith("train-labels-idx1-ubyte.gz: truncated: header says (3000000000,) = "
                        "3000000008 bytes, file has 108; replace the file with a fresh copy")


def test_an_idx_file_is_read_no_further_than_its_header_declares(tmp_path):
    """A labels file that decompresses to 256 MB past what its header declares: the reader
    counts the excess instead of holding it (reading it whole would take 256 MB)."""
    d = _mnist_copy(tmp_path)
    test_labels = d / "t10k-labels-idx1-ubyte.gz"
    head = gzip.decompress(test_labels.read_bytes())
    test_labels.write_bytes(_gzip_stream(head, 256 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(mdata.DataError, match="has trailing bytes: header says"):
            mdata.load_split("mnist", "test", d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
