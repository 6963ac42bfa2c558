"""A non-editable install works away from the checkout: the wheel carries the shipped models and
MNIST (with its README: attribution and license), and the CLI finds them inside the package.

The wheel is built offline (``pip wheel --no-build-isolation``) from a copy of the files git
tracks or would track, so the work tree stays clean, and installed with ``--no-deps`` into a
fresh venv that sees the project venv's dependencies through a ``.pth`` path line (a plain path
line: the project's editable-install ``.pth`` in that folder is not processed, so it cannot
leak in). The commands then run from an empty temporary folder.

The test prints the wheel's size and each command's wall time (run with ``-s``).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("baseline", "baseline-2step", "fashion-reduced-cond", "pruned", "reduced",
          "reduced-2step", "reduced-int8", "reduced-cond", "reduced-cond-2step", "shallow")
MNIST = ("README.md", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TIMEOUT = 300  # seconds for any one command: a hang fails the test instead of stalling it


def _run(args, **kw) -> subprocess.CompletedProcess:
    """Run ``args``; fail with its output unless it exits 0. Prints its wall time (``-s``)."""
    t0 = time.perf_counter()
    r = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True,
                       timeout=TIMEOUT, **kw)
    cmd = " ".join(Path(str(a)).name if i < 2 else str(a) for i, a in enumerate(args))
    print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def _git(*args) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True,
                          timeout=60).stdout


def _source_copy(dest: Path) -> Path:
    """The files git tracks or would track (untracked, not ignored), copied from the work tree."""
    try:
        listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to build the wheel from")
    for rel in filter(None, listing.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # skips files deleted in the work tree but still in the index
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv, wheel)``: a fresh venv with the wheel installed, not editable."""
    tmp = tmp_path_factory.mktemp("install")
    before = _git("status", "--porcelain", "--ignored")
    src = _source_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("minidiff-*.whl")
    assert _git("status", "--porcelain", "--ignored") == before, "the build wrote into the tree"
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(_run([venv / "bin" / "python", "-c",
                      "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_minidiff_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # the project venv's pip, run by the new interpreter, installs into the new venv;
    # --ignore-installed: the editable minidiff it also sees is not to be uninstalled
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
          "--ignore-installed", "--disable-pip-version-check", "-q", wheel])
    return venv, wheel


@pytest.fixture
def env():
    """The environment of a user's shell: no checkout on the path. The cache is the session's
    (conftest): checksum stamps are keyed by path, so the packaged files are verified afresh,
    while the eval reference features other tests computed are reused."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINIDIFF_DATA")}
    return {**e, "PYTHONNOUSERSITE": "1"}


def test_wheel_carries_the_models_and_mnist_once(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
    for model in MODELS:
        for f in ("config.json", "model.safetensors"):
            assert f"minidiff/assets/models/{model}/{f}" in names
    for f in MNIST:
        assert f"minidiff/assets/data/mnist/{f}" in names
    assert "minidiff/assets/serve.html" in names
    assert all(n.startswith(("minidiff/", "minidiff-")) for n in names), "stray top-level files"
    assert len(names) == len(set(names))


def test_installed_package_is_the_one_imported(installed, env, tmp_path):
    venv, _ = installed
    code = ("import json, sys, minidiff, minidiff.checkpoint as c, minidiff.data as d; "
            "print(json.dumps([[minidiff.__file__, str(c.SHIPPED_DIR), str(d.PACKAGED_DIR)], "
            "sys.path]))")
    paths, path = json.loads(_run([venv / "bin" / "python", "-c", code], cwd=tmp_path,
                                  env=env).stdout)
    for p in paths:
        assert Path(p).resolve().is_relative_to(venv.resolve()), p
    assert str(ROOT / "src") not in path, "the editable install leaked in"


def test_cli_runs_outside_the_checkout(installed, env, tmp_path):
    venv, _ = installed
    exe = venv / "bin" / "minidiff"
    out = _run([exe, "models"], cwd=tmp_path, env=env).stdout
    assert "reduced" in out
    _run([exe, "sample", "reduced", "--n", "16", "--out", "x.npz", "--no-progress"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "x.npz").is_file()
    out = _run([exe, "eval", "x.npz"], cwd=tmp_path, env=env).stdout
    assert "n = 16" in out
    _run([exe, "train", "--preset", "reduced", "--steps", "20", "--subset", "256",
          "--batch-size", "16", "--no-progress", "--out", "r"], cwd=tmp_path, env=env)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model_sha256"]
    # MNIST came from the package (and verified by SHA-256), not from a checkout or the cache
    rows = json.loads(_run([exe, "data", "list", "--json"], cwd=tmp_path, env=env).stdout)
    mnist = next(r for r in rows if r["name"] == "mnist")
    assert mnist["verified"] and Path(mnist["found"]).resolve().is_relative_to(venv.resolve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_outside_the_checkout(installed, env, tmp_path):
    venv, _ = installed
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([venv / "bin" / "minidiff", "serve", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/api/models", timeout=2) as r:
                    models = json.loads(r.read())["models"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"minidiff serve did not answer:\n"
                                f"{(tmp_path / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.2)
        assert set(models) == set(MODELS)
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        req = urllib.request.Request(url + "/api/generate", method="POST",
                                     data=json.dumps({"model": "reduced", "n": 1,
                                                      "steps": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["grid"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
