"""`minidiff study --preset smoke` end to end, and its resume."""

import json
import shutil
from dataclasses import asdict

import pytest

import minidiff.study.pipeline as study_mod
from minidiff.apps.cli import main
from minidiff.checkpoint import SHIPPED_DIR, load_checkpoint
from minidiff.errors import MinidiffError
from minidiff.study import PRESETS, Study

from .test_faults import disk_fills, fails, other_process_holds, snapshot

REQUIRED = ("model", "params", "size_mb", "macs", "pseudo_fid", "kid", "precision", "recall",
            "ssim", "memorization", "latency_10k_s", "sampler", "steps")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "smoke"
    assert main(["study", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def spy_on_train(monkeypatch) -> list:
    """Record the ``resume`` flag of every training call (training still runs)."""
    calls, real = [], study_mod.train

    def spy(*a, **k):
        calls.append(k.get("resume"))
        return real(*a, **k)

    monkeypatch.setattr(study_mod, "train", spy)
    return calls


def test_smoke_study_writes_results_report_and_figures(smoke):
    rows = json.loads((smoke / "results.json").read_text())
    assert isinstance(rows, list)
    models = [r["model"] for r in rows]
    best = rows[0]["best"]
    assert models == ["baseline", "pruned", "reduced", "shallow", f"{best}-int8", f"{best}-fp16"]
    for r in rows:
        assert all(k in r for k in REQUIRED), [k for k in REQUIRED if k not in r]
        assert r["n"] == 64 and r["sampler"] == "dpmpp-sde" and r["steps"] == 2
    by = {r["model"]: r for r in rows}
    # pruning really shrank the model: fewer parameters, MACs and bytes, 30% zeros kept
    assert by["pruned"]["params"] < 0.85 * by["baseline"]["params"]
    assert by["pruned"]["macs"] < by["baseline"]["macs"]
    assert by["pruned"]["bytes"] < 0.7 * by["baseline"]["bytes"]
    assert by["pruned"]["nonzero_params"] < 0.75 * by["pruned"]["params"]
    assert by[f"{best}-int8"]["bytes"] < 0.4 * by[best]["bytes"]
    report = (smoke / "report.md").read_text()
    for r in rows:
        assert f"| {r['model']} |" in report
        assert (smoke / "figures" / f"grid-{r['model']}.png").is_file()
    assert "10.75" in report  # the study's own numbers sit beside ours
    for fig in ("quality_vs_size.png", "quality_vs_latency.png", "class_balance.png"):
        assert (smoke / "figures" / fig).read_bytes()[:4] == b"\x89PNG"


def test_smoke_study_trains_at_equal_compute_and_plots_curves(smoke):
    """Reduced and shallow train the baseline's FLOPs (not its epochs); every model's
    evaluations during training land in curves.json, chained across its stages."""
    points = json.loads((smoke / "curves.json").read_text())
    assert {p["model"] for p in points} == {"baseline", "pruned", "reduced", "shallow"}
    end = {m: max(p["train_flops"] for p in points if p["stage"] == m)
           for m in ("baseline", "reduced", "shallow")}
    images = {m: max(p["images_seen"] for p in points if p["stage"] == m) for m in end}
    for m in ("reduced", "shallow"):  # equal within one step of a tiny run
        assert end[m] == pytest.approx(end["baseline"], rel=0.15), (m, end)
    assert images["reduced"] > 3 * images["baseline"]
    assert images["baseline"] > 2 * images["shallow"]
    for m in ("baseline", "pruned", "reduced", "shallow"):  # compute grows along each curve,
        flops = [p["train_flops"] for p in points if p["model"] == m]  # fine-tuning included
        assert flops == sorted(flops) and len(flops) >= 2, (m, flops)
    pruned = [p for p in points if p["model"] == "pruned"]
    assert pruned[0]["stage"] == "baseline" and pruned[0]["train_flops"] == end["baseline"]
    assert pruned[-1]["epochs"] > pruned[0]["epochs"] == pytest.approx(PRESETS["smoke"].base_epochs)
    report = (smoke / "report.md").read_text()
    findings = [ln for ln in report.splitlines() if ln.startswith("- **At equal")]
    assert any("training compute" in ln for ln in findings)
    assert any("epochs" in ln for ln in findings)
    for ln in findings:  # each compares at least two models
        assert sum(f"{m} " in ln for m in ("baseline", "reduced", "shallow")) >= 2, ln
    assert "the same FLOPs from scratch" in report
    assert (smoke / "figures" / "quality_vs_compute.png").read_bytes()[:4] == b"\x89PNG"


def test_value_at_interpolates_log_log():
    from minidiff.study.report import value_at

    pts = [{"model": "m", "x": 10, "pseudo_fid": 8.0}, {"model": "m", "x": 1000, "pseudo_fid": 2.0}]
    assert value_at(pts, "m", "x", 100) == pytest.approx(4.0)  # halfway in log-log
    assert value_at(pts, "m", "x", 1000) == pytest.approx(2.0)
    assert value_at(pts, "m", "x", 5000) is None


def test_only_trains_the_named_models_then_stops(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "--preset", "smoke", "--out", str(out), "--only", "shallow",
                 "--no-progress"]) == 0
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (out / "stages").iterdir())
    assert stages == ["shallow", "shallow-ft"]
    assert not (out / "results.json").exists()
    capsys.readouterr()
    assert main(["study", "--preset", "smoke", "--out", str(out), "--only", "wide"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only wide" in err[0] and "baseline" in err[0]
    assert main(["study", "--preset", "smoke", "--out", str(out), "--only", "shallow",
                 "--export", str(tmp_path / "m")]) == 1
    assert "without --only" in capsys.readouterr().err


def test_rerun_skips_finished_stages(smoke, monkeypatch, capsys):
    def no_training(*a, **k):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(study_mod, "train", no_training)
    before = (smoke / "results.json").read_text()
    assert main(["study", "--preset", "smoke", "--out", str(smoke), "--no-progress"]) == 0
    after = json.loads((smoke / "results.json").read_text())
    assert [r["pseudo_fid"] for r in after] == [r["pseudo_fid"] for r in json.loads(before)]
    assert "done" in capsys.readouterr().out


def test_unfinished_training_stage_resumes(smoke, tmp_path, monkeypatch):
    """A stage folder without stage.json (a killed run) is resumed, not restarted."""
    import shutil

    out = tmp_path / "s"
    shutil.copytree(smoke, out)
    stage = next((out / "stages").glob("reduced-ft-*"))
    (stage / "stage.json").unlink()
    calls = spy_on_train(monkeypatch)
    Study(PRESETS["smoke"], out, progress=False, log=lambda *_: None).run()
    assert calls == [True]
    assert (stage / "stage.json").is_file()


def test_stage_stopped_before_its_first_checkpoint_starts_over(smoke, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(smoke, out)
    stage = next((out / "stages").glob("reduced-ft-*"))
    (stage / "stage.json").unlink()
    shutil.rmtree(stage / "checkpoints")  # config.json and model are there, no checkpoint
    calls = spy_on_train(monkeypatch)
    Study(PRESETS["smoke"], out, progress=False, log=lambda *_: None).run()
    assert calls == [False]
    assert (stage / "stage.json").is_file()


def test_readme_table_is_the_committed_results_json():
    """The study's tables are generated from results/study/results.json, not typed: docs'
    in full, and the README's rows of the study's models carry its parameters, pseudo-FID and
    time."""
    from pathlib import Path

    from minidiff.study.report import readme_table

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "results" / "study" / "results.json").read_text())
    assert readme_table(rows) in (root / "docs" / "study.md").read_text()
    readme = {line.split("|")[1].strip(): line for line in
              (root / "README.md").read_text().splitlines() if line.startswith("| `")}
    for r in rows:
        if r["model"] != "reduced-fp16":
            line = readme[f"`{r['model']}`"]
            for value in (f"{r['params']:,}", f"{r['pseudo_fid']:.3f}",
                          f"{r['latency_10k_s']:.1f} s"):
                assert value in line, (r["model"], value)
    fashion = json.loads((root / "results" / "fashion" / "study-quick" / "results.json")
                         .read_text())
    assert readme_table(fashion) in (root / "docs" / "datasets.md").read_text()
    # and the shipped models are the study's, by name: an fp16 copy of the evaluated weights
    # (which records their SHA-256), or the evaluated file itself
    by = {r["model"]: r for r in rows}
    for name in ("baseline", "pruned", "reduced", "shallow", f"{rows[0]['best']}-int8"):
        cfg = json.loads((SHIPPED_DIR / name / "config.json").read_text())
        source = cfg["quantized"]["from_sha256"] if cfg["storage"].get("half") and \
            not cfg["storage"].get("int8") else cfg["model_sha256"]
        assert source == by[name]["checkpoint_sha256"], name


def test_long_stage_names_match_the_committed_study(tmp_path):
    """The committed `long` study's stage folders are what today's code names them: a changed
    training default or preset would otherwise orphan them silently (hours of retraining)."""
    from pathlib import Path

    from minidiff.study.pipeline import preset_macs
    from minidiff.study.reference import RECIPES

    root = Path(__file__).resolve().parents[1]
    rows = {r["model"]: r for r in json.loads((root / "results" / "study" / "results.json")
                                              .read_text())}
    assert rows["baseline"]["preset"] == "long"
    st = Study(PRESETS["long"], tmp_path)
    c = st.cfg
    base = st.stage("baseline", "baseline", epochs=c.base_epochs, lr=c.lr)[0]
    assert rows["baseline"]["checkpoint"] == f"stages/{base.name}"
    for arch in ("reduced", "shallow"):
        scratch = st.stage(arch, arch, epochs=c.epochs_of(arch, preset_macs), lr=c.lr)[0]
        ft = st.stage(f"{arch}-ft", arch, init=scratch / "model.safetensors",
                      depends=scratch.name, lr=RECIPES[arch]["lr"],
                      epochs=c.finetune_epochs(RECIPES[arch]["epochs"], preset_macs,
                                               arch))[0]
        assert rows[arch]["checkpoint"] == f"stages/{ft.name}", arch


def test_a_second_study_on_one_folder_stops_at_once(tmp_path, capsys):
    out = tmp_path / "s"
    with other_process_holds(out) as pid:
        err = fails(capsys, "study", "--preset", "smoke", "--out", out, "--no-progress")
    assert err == (f"minidiff: error: {out} is in use by process {pid}; wait for it to finish "
                   "(or stop it) and run the command again")
    assert [p.name for p in out.iterdir()] == [".lock"]  # not even study.json was written


def test_a_stage_another_run_is_training_is_left_alone(smoke, tmp_path):
    """--only runs share a study folder: a stage another process holds (here one stopped
    before its first checkpoint, which this run would otherwise clear) is neither cleared nor
    trained twice."""
    out = tmp_path / "s"
    shutil.copytree(smoke, out)
    stage = next((out / "stages").glob("reduced-ft-*"))
    (stage / "stage.json").unlink()
    shutil.rmtree(stage / "checkpoints")
    before = snapshot(stage)
    with other_process_holds(stage) as pid:
        with pytest.raises(MinidiffError, match=f"is in use by process {pid}"):
            Study(PRESETS["smoke"], out, progress=False, log=lambda *_: None).run(("reduced",))
    assert snapshot(stage) == before


def test_a_folder_that_holds_something_else_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study_mod, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "s"
    out.mkdir()
    (out / "report.md").write_text("the user's")
    err = fails(capsys, "study", "--preset", "smoke", "--out", out)
    assert err == (f"minidiff: error: {out} already exists and holds no study; pass --force to "
                   "write the study into it or choose another --out")
    other = tmp_path / "t"
    other.mkdir()
    (other / "study.json").write_text(json.dumps(asdict(PRESETS["smoke"])))
    err = fails(capsys, "study", "--preset", "smoke", "--seed", "1", "--out", other)
    assert err == (f"minidiff: error: {other} holds another study (seed); re-run its own "
                   "command to resume it, pass --force to replace its results, or choose "
                   "another --out")
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert [p.name for p in other.iterdir()] == ["study.json"]


def test_export_swaps_verified_copies_in_and_needs_force_to_replace(smoke, tmp_path, capsys,
                                                                    monkeypatch):
    dest = tmp_path / "models"
    argv = ["study", "--preset", "smoke", "--out", smoke, "--no-progress", "--export", dest]
    assert main([str(a) for a in argv]) == 0
    best = json.loads((smoke / "results.json").read_text())[0]["best"]
    names = ["baseline", "pruned", "reduced", "shallow", f"{best}-int8"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    before = snapshot(dest)
    # refused before the study runs, naming the model and the flag
    monkeypatch.setattr(study_mod, "run_study", lambda *a, **k: pytest.fail("the study ran"))
    err = fails(capsys, *argv)
    assert err == (f"minidiff: error: {dest / 'baseline'} already holds a model; pass --force "
                   "to replace it or choose another --export DIR")
    monkeypatch.undo()
    # a disk that fills half-way through the second model leaves every model loadable
    writes = []

    def second_model(name):
        writes.append(name)
        return name == "model.safetensors" and writes.count(name) == 2

    disk_fills(monkeypatch, second_model)
    assert "No space left on device" in fails(capsys, *argv, "--force")
    monkeypatch.undo()
    assert snapshot(dest) == before  # the first was replaced by the same bytes, the rest kept
    for name in names:
        load_checkpoint(dest / name)
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)  # nothing half-written
    assert main([str(a) for a in argv] + ["--force"]) == 0
    assert snapshot(dest) == before
