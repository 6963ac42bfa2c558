"""Every case in docs/errors.md is run here, and its message must match the documented one.

The doc's table has one row per case: ``| id | command | message |``. In the message column,
``…`` stands for any text (paths, digests). A case here without a row, or a row without a case,
fails the test, so the doc cannot drift from what users see.
"""

import asyncio
import contextlib
import errno
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import urllib.error
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from minidiff import data as mdata
from minidiff import files as mio
from minidiff.apps.cli import main
from minidiff.apps.serve import Binding, Guard
from minidiff.compress import prune_checkpoint
from minidiff.study import PRESETS

from .test_faults import _npy_header, _npz, other_process_holds

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TINY = ["--preset", "reduced", "--channels", "8,16", "--batch-size", "8", "--subset", "16",
        "--precision", "fp32", "--no-progress"]


def doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`?([a-z0-9-]+)`?\s*\|(.*)\|(.*)\|\s*$", line)
        if m and m.group(1) != "id" and set(m.group(1)) != {"-"}:
            rows[m.group(1)] = m.group(3).strip().strip("`").strip()
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("err") / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


def mnist_copy(tmp, mutate):
    src = mdata.find_dataset("mnist")
    dst = tmp / "mnist"
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def _truncate(d):
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-100]))


def _flip(d):
    f = d / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] ^= 1
    f.write_bytes(gzip.compress(bytes(raw)))


def _magic(d):
    f = d / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[3] = 3
    f.write_bytes(gzip.compress(bytes(raw)))


def _badgz(d):
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-50])


def _billions(d):
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(struct.pack(">II", mdata.LABELS_MAGIC, 3_000_000_000)
                                + bytes(100)))


def _save_npz(tmp, arr):
    f = tmp / "s.npz"
    np.savez(f, images=arr)
    return str(f)


def _read_only(folder: Path, stack: contextlib.ExitStack) -> None:
    """Make ``folder`` unwritable for the case (root ignores mode bits: immutable instead)."""
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is not available")
        stack.callback(subprocess.run, ["chattr", "-i", str(folder)])
    else:
        folder.chmod(0o555)
        stack.callback(folder.chmod, 0o755)


# the cases `minidiff serve` answers over HTTP: (method, headers, status)
HTTP = {"host-refused": ("GET", {"host": "evil.example:7860"}, 421),
        "origin-refused": ("POST", {"host": "127.0.0.1:7860", "origin": "http://evil.example"},
                           403)}


def http_answer(case: str) -> str:
    """The one line `minidiff serve` (on 127.0.0.1:7860) answers a documented HTTP case with,
    having checked its status; the request never reaches the app."""
    method, headers, status = HTTP[case]
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("the request reached the app")

    async def receive():
        return {"type": "http.request", "body": b"{}"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/api/generate",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(Guard(app, Binding())(scope, receive, send))
    assert sent[0]["status"] == status
    return json.loads(sent[1]["body"])["error"]


def case_args(case, tmp, run, monkeypatch, stack):
    """argv for one documented case (and any environment it needs, held open by ``stack``)."""
    t = str(tmp)
    data_case = {"data-truncated": _truncate, "data-checksum": _flip, "data-magic": _magic,
                 "data-gzip": _badgz, "data-billions": _billions}
    if case in data_case:
        d = mnist_copy(tmp, data_case[case])
        return ["train", *TINY, "--steps", "1", "--data-dir", str(d), "--out", t + "/o"]
    if case == "data-missing":
        (tmp / "empty").mkdir()
        monkeypatch.setattr(mdata, "PACKAGED_DIR", tmp / "none")
        monkeypatch.setattr(mdata, "SYSTEM_DIR", tmp / "none")
        return ["train", *TINY, "--steps", "1", "--data-dir", t + "/empty", "--out", t + "/o"]
    if case == "data-dir-missing":
        return ["train", *TINY, "--data-dir", t + "/nowhere", "--out", t + "/o"]
    if case == "fetch-offline":
        def offline(*a, **k):
            raise urllib.error.URLError("Name or service not known")
        monkeypatch.setattr("urllib.request.urlopen", offline)
        return ["data", "fetch", "mnist", "--dest", t + "/m"]
    if case == "epochs-negative":
        return ["train", "--epochs", "-1", "--out", t + "/o"]
    if case == "unknown-preset":
        return ["train", "--preset", "huge", "--out", t + "/o"]
    if case == "unknown-dataset":
        return ["train", "--dataset", "cifar10", "--out", t + "/o"]
    if case == "bad-channels":
        return ["train", "--channels", "12,24", "--out", t + "/o"]
    if case == "run-exists":
        return ["train", *TINY, "--steps", "1", "--out", str(run)]
    if case == "resume-nothing":
        (tmp / "o").mkdir()
        return ["train", *TINY, "--out", t + "/o", "--resume"]
    if case == "diverged":
        return ["train", *TINY, "--steps", "50", "--lr", "1e30", "--out", t + "/o"]
    if case == "disk-full":
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(mio.os, "fsync", full)
        return ["train", *TINY, "--steps", "1", "--out", t + "/o"]
    if case == "no-cuda":
        return ["train", *TINY, "--steps", "1", "--device", "cuda", "--out", t + "/o"]
    if case == "n-zero":
        return ["sample", str(run), "--n", "0", "--out", t + "/s.npz"]
    if case == "steps-too-many":
        return ["sample", str(run), "--steps", "1001", "--out", t + "/s.npz"]
    if case == "unknown-sampler":
        return ["sample", str(run), "--sampler", "euler", "--out", t + "/s.npz"]
    if case == "out-not-npz":
        return ["sample", str(run), "--out", t + "/s.png"]
    if case == "ckpt-missing":
        return ["sample", t + "/nope", "--out", t + "/s.npz"]
    if case == "ckpt-no-weights":
        return ["sample", t, "--out", t + "/s.npz"]
    if case == "ckpt-pickle":
        (tmp / "m.pt").write_bytes(b"\x80\x04K\x01.")
        return ["sample", t + "/m.pt", "--out", t + "/s.npz"]
    if case == "ckpt-corrupt":
        r = tmp / "r"
        shutil.copytree(run, r)
        w = r / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
        return ["sample", str(r), "--out", t + "/s.npz"]
    if case == "ckpt-mismatch":
        r = tmp / "r"
        shutil.copytree(run, r)
        cfg = json.loads((r / "config.json").read_text())
        cfg["model"]["channels"] = [8, 32]
        (r / "config.json").write_text(json.dumps(cfg))
        w = r / "model.safetensors"
        lone = tmp / "lone"
        lone.mkdir()
        shutil.copy(w, lone / "model.safetensors")
        shutil.copy(r / "config.json", lone / "config.json")
        cfg["model_sha256"] = None
        (lone / "config.json").write_text(json.dumps(cfg))
        return ["sample", str(lone), "--out", t + "/s.npz"]
    if case == "class-unconditional":
        return ["sample", str(run), "--class", "7", "--out", t + "/s.npz"]
    if case == "class-uneven":
        c = tmp / "c"
        assert main(["train", *TINY, "--conditional", "--steps", "1", "--out", str(c)]) == 0
        return ["sample", str(c), "--class", "all", "--n", "25", "--out", t + "/s.npz"]
    if case == "samples-missing":
        return ["grid", t + "/none.npz", "--out", t + "/g.png"]
    if case == "samples-dtype":
        return ["grid", _save_npz(tmp, np.zeros((2, 28, 28), np.float64)), "--out", t + "/g.png"]
    if case == "samples-shape":
        return ["grid", _save_npz(tmp, np.zeros((2, 32, 32), np.uint8)), "--out", t + "/g.png"]
    if case == "samples-nan":
        return ["grid", _save_npz(tmp, np.full((2, 28, 28), np.nan)), "--out", t + "/g.png"]
    if case == "samples-not-npz":
        (tmp / "s.npz").write_bytes(b"not a zip")
        return ["grid", t + "/s.npz", "--out", t + "/g.png"]
    if case == "prune-nothing":
        return ["prune", str(run), "--out", t + "/p"]
    if case == "prune-ratio":
        return ["prune", str(run), "--structured", "1.5", "--out", t + "/p"]
    if case == "recipe-no-init":
        return ["train", *TINY, "--recipe", "pruned", "--out", t + "/r"]
    if case == "quantize-exists":
        (tmp / "q").mkdir()
        for name in ("model.safetensors", "config.json"):
            shutil.copy(run / name, tmp / "q")
        return ["quantize", str(run), "--out", t + "/q"]
    if case == "samples-objects":
        return ["grid", _save_npz(tmp, np.array([None, 1], dtype=object)), "--out", t + "/g.png"]
    if case == "samples-huge":
        f = _npz(tmp / "s.npz", {"images.npy": _npy_header((10**9, 28, 28)) + bytes(100)})
        return ["grid", str(f), "--out", t + "/g.png"]
    if case == "ckpt-config-list":
        r = tmp / "r"
        shutil.copytree(run, r)
        (r / "config.json").write_text("[]")
        return ["sample", str(r), "--out", t + "/s.npz"]
    if case == "ckpt-sparse-mask":
        p = tmp / "p"
        prune_checkpoint(run, p, unstructured=0.3)
        cfg = json.loads((p / "config.json").read_text())
        cfg["model"]["channels"] = [8, 1 << 20]
        cfg.pop("model_sha256")
        (p / "config.json").write_text(json.dumps(cfg))
        return ["sample", str(p), "--out", t + "/s.npz"]
    if case == "lock-held":
        stack.enter_context(other_process_holds(tmp / "s"))
        return ["study", "--preset", "smoke", "--out", t + "/s"]
    if case in ("sample-exists", "grid-exists", "eval-json-exists"):
        (tmp / "old").write_bytes(b"the user's")
        return {"sample-exists": ["sample", str(run), "--out", t + "/old"],
                "grid-exists": ["grid", t + "/s.npz", "--out", t + "/old"],
                "eval-json-exists": ["eval", t + "/s.npz", "--json", t + "/old"]}[case]
    if case == "out-exists":
        (tmp / "p").mkdir()
        (tmp / "p" / "notes.txt").write_text("the user's")
        return ["prune", str(run), "--unstructured", "0.3", "--out", t + "/p"]
    if case == "export-exists":
        (tmp / "m" / "baseline").mkdir(parents=True)
        shutil.copy(run / "config.json", tmp / "m" / "baseline")
        return ["study", "--out", t + "/s", "--export", t + "/m"]
    if case in ("study-not-a-study", "study-other"):
        (tmp / "s").mkdir()
        (tmp / "s" / "notes.txt").write_text("the user's")
        if case == "study-other":
            (tmp / "s" / "study.json").write_text(json.dumps(asdict(PRESETS["smoke"])))
            return ["study", "--preset", "smoke", "--seed", "1", "--out", t + "/s"]
        return ["study", "--out", t + "/s"]
    if case == "demo-not-a-run":
        (tmp / "d").mkdir()
        (tmp / "d" / "report.md").write_text("the user's")
        return ["demo", "--out", t + "/d"]
    if case == "read-only":
        _read_only(tmp / "ro", stack)
        return ["sample", str(run), "--n", "2", "--steps", "1", "--no-progress", "--out",
                t + "/ro/s.npz"]
    if case == "serve-network":
        return ["serve", "--host", "0.0.0.0"]
    raise KeyError(case)


def files_of(run: Path) -> dict:
    """Every file of the run folder with its mtime (its lock file records only who last held
    it)."""
    return {p: p.stat().st_mtime_ns for p in Path(run).rglob("*")
            if p.is_file() and p.name != mio.LOCK_FILE}


CASES = ["data-truncated", "data-checksum", "data-magic", "data-gzip", "data-missing",
         "data-dir-missing", "fetch-offline", "epochs-negative", "unknown-preset",
         "unknown-dataset", "bad-channels", "run-exists", "resume-nothing", "diverged",
         "disk-full", "no-cuda", "n-zero", "steps-too-many", "unknown-sampler", "out-not-npz",
         "ckpt-missing", "ckpt-no-weights", "ckpt-pickle", "ckpt-corrupt", "ckpt-mismatch",
         "class-unconditional", "class-uneven", "samples-missing", "samples-dtype",
         "samples-shape", "samples-nan", "samples-not-npz",
         "prune-nothing", "prune-ratio", "recipe-no-init", "quantize-exists",
         "data-billions", "samples-objects", "samples-huge", "ckpt-config-list",
         "ckpt-sparse-mask", "lock-held", "sample-exists", "grid-exists", "eval-json-exists",
         "out-exists", "export-exists", "study-not-a-study", "study-other", "demo-not-a-run",
         "read-only", "serve-network", *HTTP]


def test_doc_lists_exactly_the_tested_cases():
    assert sorted(doc_rows()) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_documented_message(case, tmp_path, run, monkeypatch, capsys):
    if case == "no-cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is visible here, so --device cuda is valid")
    if case in HTTP:
        err = [http_answer(case)]
    else:
        with contextlib.ExitStack() as stack:
            argv = case_args(case, tmp_path, run, monkeypatch, stack)
            before = files_of(run)
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse errors exit 2
                rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1, (rc, err)
    if os.environ.get("MINIDIFF_PRINT_ERRORS"):
        print(f"\n{case}: {err[0]}")
    pattern = ".*".join(re.escape(part) for part in doc_rows()[case].split("…"))
    assert re.search(pattern, err[0]), f"\n doc: {doc_rows()[case]}\n got: {err[0]}"
    if case not in HTTP:  # nothing that was already on disk changed
        assert before == files_of(run)
        for mine in ("old", "p/notes.txt", "s/notes.txt", "d/report.md"):
            if (tmp_path / mine).is_file():
                assert (tmp_path / mine).read_bytes() == b"the user's", mine


def test_guarantees_name_tests_that_exist():
    """docs/guarantees.md proves each promise by naming tests: each must be a test function of
    the file it names."""
    text = (DOC.parent / "guarantees.md").read_text()
    named = re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in named
               if not re.search(rf"^def {t}\(", (DOC.parents[1] / "tests" / f).read_text(),
                                re.MULTILINE)]
    assert not missing, missing
