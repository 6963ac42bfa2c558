import json
import subprocess
import sys

import numpy as np
import pytest

from minidiff.apps.cli import main
from minidiff.settings import SamplingConfig


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidiff: error:"), err
    return err[0]


@pytest.mark.parametrize("argv,code,needle", [
    (["train", "--epochs", "-1", "--out", "x"], 2, "must be > 0, got -1"),
    (["train", "--preset", "huge", "--out", "x"], 2, "invalid choice: 'huge'"),
    (["train", "--dataset", "cifar", "--out", "x"], 2, "invalid choice: 'cifar'"),
    (["train", "--epochs", "1", "--steps", "3", "--out", "x"], 2, "not allowed with"),
    (["sample", "missing-run", "--out", "s.npz"], 1, "no such checkpoint"),
    (["sample", "missing-run", "--n", "0", "--out", "s.npz"], 2, "must be > 0, got 0"),
    (["sample", "missing-run", "--sampler", "euler", "--out", "s.npz"], 2, "invalid choice"),
    (["frobnicate"], 2, "invalid choice"),
    (["train", "--eval-every", "10,0", "--out", "x"], 2, "must be > 0, got 10,0"),
    (["train", "--eval-every", "ten", "--out", "x"], 2, "expected a step count"),
    (["train", "--prediction", "x0", "--out", "x"], 2, "invalid choice: 'x0'"),
])
def test_bad_flags_give_one_line_and_nonzero_exit(argv, code, needle, capsys, tmp_path,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if code == 2 else _no_raise() as exc:
        rc = main(argv)
    rc = exc.value.code if code == 2 else rc
    assert rc == code
    assert needle in one_error_line(capsys)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_steps_beyond_T_and_bad_out(run_dir, capsys, tmp_path):
    assert main(["sample", str(run_dir), "--steps", "1001", "--out", str(tmp_path / "s.npz")]) == 1
    assert "--steps must be in 1..1000" in one_error_line(capsys)
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "s.png")]) == 1
    assert "must end in .npz" in one_error_line(capsys)
    assert not list(tmp_path.iterdir())  # nothing written


def test_sample_writes_npz_sidecar_and_grid(run_dir, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    argv = ["sample", str(run_dir), "--n", "5", "--steps", "4", "--batch-size", "2",
            "--out", str(out), "--grid", str(grid), "--no-progress"]
    assert main(argv) == 0
    images = np.load(out)["images"]
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["sampler"], meta["spacing"], meta["rho"]) == ("dpmpp-sde", "karras", 2.0)
    assert meta["steps"] == 4 and meta["seed"] == 0
    # the whole SamplingConfig, resolved (precision auto -> what ran; no class, no guidance)
    assert SamplingConfig.from_dict(meta) == SamplingConfig(
        steps=4, batch_size=2, precision=meta["precision"], guidance=None)
    assert set(SamplingConfig().to_dict()) <= set(meta)
    assert len(meta["checkpoint_sha256"]) == 64
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    again = ["sample", str(run_dir), "--n", "5", "--steps", "4", "--batch-size", "2",
             "--out", str(tmp_path / "t.npz"), "--no-progress"]
    assert main(again) == 0
    assert np.array_equal(np.load(tmp_path / "t.npz")["images"], images)  # same seed
    capsys.readouterr()
    assert main(["grid", str(out), "--out", str(tmp_path / "g.jpg")]) == 1
    assert "the grid must be a .png file" in one_error_line(capsys)
    assert not (tmp_path / "g.jpg").exists()


def test_existing_out_needs_resume(run_dir, capsys):
    assert main(["train", "--steps", "1", "--out", str(run_dir), "--no-progress"]) == 1
    assert "pass --resume" in one_error_line(capsys)


def test_models_lists_presets_with_params_and_macs(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"baseline", "reduced", "shallow"}
    assert all(r["params"] > 0 and r["macs_per_image"] > 0 for r in rows.values())


def test_data_list_reports_mnist_verified(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mnist"]["verified"] is True
    assert "fashion-mnist" in rows


def test_console_script_prints_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "minidiff", "sample", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "s.npz")], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "no such checkpoint" in p.stderr


def test_sample_with_spacing_and_fast_samplers_records_them(run_dir, tmp_path, capsys):
    for sampler, extra in (("ddim", ["--eta", "0.5"]), ("dpmpp", [])):
        out = tmp_path / f"{sampler}.npz"
        assert main(["sample", str(run_dir), "--n", "3", "--steps", "5", "--sampler", sampler,
                     "--spacing", "quadratic", *extra, "--out", str(out), "--no-progress"]) == 0
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["sampler"] == sampler and meta["spacing"] == "quadratic"
        assert np.load(out)["images"].shape == (3, 28, 28)
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--eta", "1", "--out", str(tmp_path / "e.npz")]) == 1
    assert "--eta applies to --sampler ddim only" in one_error_line(capsys)
    # --rho reaches the spacing: other timesteps, other images, and the sidecar says which
    draws = {}
    for rho in ("2", "7"):
        out = tmp_path / f"rho{rho}.npz"
        assert main(["sample", str(run_dir), "--n", "2", "--steps", "4", "--rho", rho,
                     "--out", str(out), "--no-progress"]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["rho"] == float(rho)
        draws[rho] = np.load(out)["images"]
    assert not np.array_equal(draws["2"], draws["7"])
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--spacing", "trailing", "--rho", "3",
                 "--out", str(tmp_path / "r.npz")]) == 1
    assert "--rho applies to --spacing karras only" in one_error_line(capsys)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_start_without_torch(flag):
    """The parsers read only torch-free modules; the handlers import the library."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "minidiff", flag],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip()
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"minidiff.apps.cli", "minidiff.settings"} <= imported
    assert not [m for m in imported if m.split(".")[0] == "torch"]


def test_train_recipe_flags_reach_the_run_config(tmp_path, capsys):
    """--prediction, --loss-weighting, --noise-levels, --ema-power, --ema-std,
    --eval-every/--eval-n and --original-recipe end up in the run's config.json (and
    evaluations in metrics.jsonl)."""
    out = tmp_path / "r"
    assert main(["train", "--channels", "8,16", "--steps", "4", "--batch-size", "8",
                 "--subset", "16", "--prediction", "v", "--loss-weighting", "min-snr",
                 "--ema-power", "0.75", "--eval-every", "2,4", "--eval-n", "10",
                 "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["diffusion"]["prediction"] == "v"
    t = cfg["train"]
    assert (t["loss_weighting"], t["ema_power"], t["eval_every"], t["eval_n"]) == \
        ("min-snr", 0.75, [2, 4], 10)
    assert main(["train", "--channels", "8,16", "--steps", "2", "--batch-size", "8",
                 "--subset", "16", "--loss-weighting", "edm", "--noise-levels", "lognormal",
                 "--ema-std", "0.1", "--no-progress", "--out", str(tmp_path / "e")]) == 0
    t = json.loads((tmp_path / "e" / "config.json").read_text())["train"]
    assert (t["loss_weighting"], t["noise_levels"], t["ema_std"]) == ("edm", "lognormal", 0.1)
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "eval" in ln]
    assert [r["step"] for r in evals] == [2, 4]
    assert main(["train", "--channels", "8,16", "--steps", "1", "--subset", "8",
                 "--original-recipe", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    t = json.loads((tmp_path / "o" / "config.json").read_text())["train"]
    from minidiff.study.reference import TRAINING
    assert {k: t[k] for k in TRAINING} == TRAINING
