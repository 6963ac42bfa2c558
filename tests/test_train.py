import json
import shutil
import subprocess
import sys

import pytest
import torch

import minidiff.loop as loop
import minidiff.train as train_mod
from minidiff.apps.cli import main
from minidiff.checkpoint import load_checkpoint, load_state
from minidiff.data import load_split, to_model_range
from minidiff.diffusion import DiffusionConfig, DiffusionLoss, Schedule
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.files import LOCK_FILE
from minidiff.loop import lr_at
from minidiff.settings import TrainConfig, power_ema_exponent
from minidiff.study.recipes import train_config
from minidiff.train import train
from minidiff.unet import UNet
from tests.test_faults import other_process_holds

FAST = dict(batch_size=32, subset=256, precision="fp32", device="cpu", warmup_steps=5,
            log_every=10, lr=2e-3)


def eval_loss(model, x0):
    loss = DiffusionLoss(Schedule.from_config(DiffusionConfig()))
    with torch.no_grad():
        return loss(model, x0, generator=torch.Generator().manual_seed(0)).item()


def test_a_few_steps_lower_the_loss(tmp_path, tiny_cfg):
    x0 = to_model_range(load_split("mnist", "train")[0][:256])
    torch.manual_seed(0)  # train() seeds the init with cfg.seed=0 too
    before = eval_loss(UNet(tiny_cfg), x0)
    summary = train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=60, **FAST), tmp_path / "r",
                    progress=False)
    assert summary["steps"] == 60
    model, config, _ = load_checkpoint(tmp_path / "r")
    after = eval_loss(model, x0)
    assert after < 0.5 * before, (before, after)
    assert config["step"] == 60 and config["model"] == tiny_cfg.to_dict()
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40, 50, 60]
    assert all("loss" in r for r in lines)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_cfg):
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=5, **FAST), tmp_path / "r",
          progress=False)
    a, _, digest = load_checkpoint(tmp_path / "r")
    b, _, digest_b = load_checkpoint(tmp_path / "r" / "model.safetensors")
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    assert torch.equal(a(x, t), b(x, t)) and digest == digest_b
    # the .safetensors alone (no config.json beside it) rebuilds the model from its metadata
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tmp_path / "r" / "model.safetensors").read_bytes())
    (tmp_path / "config.json").unlink(missing_ok=True)
    c, _, _ = load_checkpoint(lone)
    assert torch.equal(a(x, t), c(x, t))


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tiny_cfg,
                                                                 monkeypatch):
    cfg = TrainConfig(steps=30, checkpoint_every=10, **FAST)
    train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "full", progress=False)

    real_save = loop.save_state

    def crash_after_step_20(folder, model, ema, opt, step, keep=3):
        real_save(folder, model, ema, opt, step, keep)
        if step == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", crash_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(loop, "save_state", real_save)
    train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "cut", resume=True, progress=False)
    full = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == full
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert steps == [10, 20, 30]


def test_existing_run_needs_resume(tmp_path, tiny_cfg):
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=2, **FAST), tmp_path / "r",
          progress=False)
    with pytest.raises(MinidiffError, match="already holds a run; pass --resume"):
        train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=2, **FAST), tmp_path / "r",
              progress=False)


def test_divergence_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    cfg = TrainConfig(steps=20, checkpoint_every=5, **FAST)
    real_loss = train_mod.DiffusionLoss.__call__
    calls = {"n": 0}

    def nan_at_step_7(self, *a, **k):
        calls["n"] += 1
        out = real_loss(self, *a, **k)
        return out * float("nan") if calls["n"] == 8 else out

    monkeypatch.setattr(train_mod.DiffusionLoss, "__call__", nan_at_step_7)
    with pytest.raises(MinidiffError, match="diverged at step 7: loss is nan"):
        train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "r", progress=False)
    _, config, _ = load_checkpoint(tmp_path / "r")
    assert config["step"] == 5


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, tiny_cfg):
    run = tmp_path / "r"
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=2, **FAST), run, progress=False)
    cfg = json.loads((run / "config.json").read_text())
    # config that does not match the weights (ignore the digest to reach the shape check)
    bad = {**cfg, "model": {**cfg["model"], "channels": [8, 32]}, "model_sha256": None}
    (run / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="weights do not match the model config"):
        load_checkpoint(run)
    (run / "config.json").write_text(json.dumps(cfg))
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match .* recorded in config.json"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="pickled checkpoints are not loaded"):
        (tmp_path / "x.pt").write_bytes(b"\x80\x04K\x01.")
        load_checkpoint(tmp_path / "x.pt")


def test_state_holds_optimizer_and_step(tmp_path, tiny_cfg):
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=3, **FAST), tmp_path / "r",
          progress=False)
    model = UNet(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters())
    meta = load_state(tmp_path / "r", model, UNet(tiny_cfg), opt)
    assert meta["step"] == 3 and meta["path"].endswith("checkpoints/step-00000003")
    assert all(st["step"].item() == 3 for st in opt.state_dict()["state"].values())


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 99, 100) < lr_at(cfg, 50, 100) < lr_at(cfg, 10, 100)
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-4)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(epochs=-1), "--epochs must be > 0"),
    (dict(steps=0), "--steps must be > 0"),
    (dict(epochs=1, steps=5), "not both"),
    (dict(precision="fp8"), "--precision must be"),
    (dict(dataset="cifar"), "unknown dataset"),
])
def test_train_config_validation(kwargs, msg):
    with pytest.raises(MinidiffError, match=msg):
        TrainConfig(**kwargs)


def test_recipe_fills_what_the_flags_leave_open():
    """`train --init CKPT --recipe NAME`: the recipe's epochs and lr unless given; --steps
    replaces the recipe's epochs; no recipe without --init."""
    r = train_config("reduced", init="ckpt")
    assert (r.epochs, r.steps, r.lr) == (10, None, 1e-5)
    r = train_config("pruned", init="ckpt", steps=7, lr=None)
    assert (r.epochs, r.steps, r.lr) == (None, 7, 1e-4)
    assert train_config("shallow", init="ckpt", epochs=2.0, lr=3e-3).lr == 3e-3
    assert train_config(None, epochs=None, lr=None) == TrainConfig()
    with pytest.raises(MinidiffError, match="--recipe is a fine-tuning recipe"):
        train_config("pruned", init=None)


def test_ema_warm_up_forms():
    today = TrainConfig()
    assert today.ema_decay_at(0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert today.ema_decay_at(10**6) == 0.999
    p = TrainConfig(ema_power=0.75, ema_decay=0.9999)
    assert p.ema_decay_at(0) == 0.0  # 1 - 1^-p: the first update copies the weights
    assert p.ema_decay_at(999) == pytest.approx(1 - 1000 ** -0.75)
    assert p.ema_decay_at(10**9) == 0.9999


def test_power_ema_weighs_step_tau_by_tau_to_the_gamma():
    """EDM2's power-function EMA: gamma from the relative width (16.97 and 6.94 for 0.05 and
    0.10, as in Karras et al. 2024), and after t updates with decay (1 - 1/t)^(gamma + 1) the
    average is sum_tau tau^gamma theta_tau / sum_tau tau^gamma (eq. 2; the discrete recursion
    matches it to a fraction of a percent)."""
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    cfg = TrainConfig(ema_std=0.10)
    assert cfg.ema_decay_at(0) == 0.0  # the first update copies the weights
    gamma = power_ema_exponent(0.10)
    thetas = 2 + torch.sin(torch.arange(300, dtype=torch.float64) / 20)  # a drifting weight
    model, ema = torch.nn.Linear(1, 1, bias=False).double(), torch.nn.Linear(1, 1,
                                                                             bias=False).double()
    for k, theta in enumerate(thetas):
        model.weight.data.fill_(theta)
        loop.ema_update(ema, model, cfg.ema_decay_at(k))
    tau = torch.arange(1, 301, dtype=torch.float64)
    expected = (tau ** gamma * thetas).sum() / (tau ** gamma).sum()
    assert ema.weight.item() == pytest.approx(expected.item(), rel=1e-3)
    assert ema.weight.item() != pytest.approx(thetas.mean().item(), rel=1e-2)  # not a mean
    with pytest.raises(MinidiffError, match="--ema-std"):
        TrainConfig(ema_std=0.3)


def test_recipe_fields_at_their_defaults_stay_out_of_config_json():
    """The study's stage names hash the train config: the fields added after it leave the
    dict while at their defaults and enter it when chosen."""
    assert not {"noise_levels", "ema_std", "sigma_data"} & set(TrainConfig().to_dict())
    d = TrainConfig(noise_levels="lognormal", ema_std=0.1).to_dict()
    assert (d["noise_levels"], d["ema_std"]) == ("lognormal", 0.1)
    assert TrainConfig.from_dict(d) == TrainConfig(noise_levels="lognormal", ema_std=0.1)


def test_eval_steps():
    assert TrainConfig().eval_steps(100) == []
    assert TrainConfig(eval_every=30).eval_steps(100) == [30, 60, 90, 100]
    assert TrainConfig(eval_every=(5, 50, 500)).eval_steps(100) == [5, 50, 100]
    with pytest.raises(MinidiffError, match="eval-every"):
        TrainConfig(eval_every=0)
    round_trip = TrainConfig.from_dict(json.loads(json.dumps(
        TrainConfig(eval_every=(5, 50)).to_dict())))
    assert round_trip.eval_every == (5, 50)


def test_eval_every_writes_pseudo_fid_with_images_flops_and_seconds(tmp_path, tiny_cfg,
                                                                     monkeypatch):
    cfg = TrainConfig(steps=12, checkpoint_every=6, eval_every=(4, 8), eval_n=20,
                      **{**FAST, "log_every": 4})
    out = tmp_path / "r"
    real_save = loop.save_state

    def stop_after_6(folder, model, ema, opt, step, **kw):
        real_save(folder, model, ema, opt, step, **kw)
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", stop_after_6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, DiffusionConfig(), cfg, out, progress=False)
    monkeypatch.setattr(loop, "save_state", real_save)
    train(tiny_cfg, DiffusionConfig(), cfg, out, resume=True, progress=False)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]  # the listed steps and the last
    assert [r["images_seen"] for r in evals] == [128, 256, 384]
    per_image = evals[0]["train_flops"] / 128
    assert per_image > 0 and all(r["train_flops"] == per_image * r["images_seen"] for r in evals)
    assert 0 < evals[0]["train_s"] < evals[1]["train_s"] < evals[2]["train_s"]  # across resume
    for r in evals:
        assert r["eval"]["n"] == 20 and r["eval"]["pseudo_fid"] > 0
        assert 0.1 <= r["eval"]["confidence"] <= 1


def test_a_second_writer_of_a_run_folder_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(tiny_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with other_process_holds(out) as pid:
        rc = main(["train", "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"{out} is in use by process {pid}" in err[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert after == {p: b for p, b in before.items() if p.name != LOCK_FILE}  # nothing written


def test_the_run_folder_stays_locked_for_the_whole_run(tmp_path, tiny_cfg, monkeypatch):
    out = tmp_path / "r"
    probe = [sys.executable, "-c", "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], "
             "os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / LOCK_FILE)]
    refused, real = [], loop.save_state

    def probing(folder, *a, **k):  # another process tries the lock at every checkpoint
        refused.append(subprocess.run(probe, capture_output=True).returncode != 0)
        return real(folder, *a, **k)

    monkeypatch.setattr(loop, "save_state", probing)
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=2, checkpoint_every=1, **FAST), out,
          progress=False)
    assert refused == [True, True]
    assert subprocess.run(probe).returncode == 0  # and released at the end


# ------------------------------------------------------------------------ time budgets

def test_budget_steps_fit_the_time_rounded_to_two_digits():
    assert loop.budget_steps(60.0, 0.0123) == 4800  # 4,878 fit
    assert loop.budget_steps(6.0, 0.5) == 12
    assert loop.budget_steps(1.0, 10.0) == 1  # at least one step
    assert loop.budget_steps(600.0, 0.001) == 600000


def test_a_time_budget_fixes_the_steps_by_a_probe_records_them_and_steps_override(
        tmp_path, tiny_cfg, monkeypatch):
    """--minutes turns into steps through the probe (0.1 minutes at 0.5 s a step: 12), which
    config.json records; training the recorded count without a budget gives the same weights
    bit for bit; --steps beside --minutes wins, and no probe runs."""
    probes = []

    def probe(method, run):
        probes.append(method.cfg.batch_size)
        return 0.5

    monkeypatch.setattr(train_mod, "seconds_per_step", probe)
    summary = train(tiny_cfg, DiffusionConfig(), TrainConfig(minutes=0.1, **FAST),
                    tmp_path / "b", progress=False)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert summary["steps"] == 12 and config["train"]["steps"] == 12 and probes == [32]
    assert config["budget"] == {"minutes": 0.1, "probe_s_per_step": 0.5, "steps": 12}
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=12, **FAST), tmp_path / "s",
          progress=False)
    budgeted, fixed = load_checkpoint(tmp_path / "b")[0], load_checkpoint(tmp_path / "s")[0]
    assert all(torch.equal(a, b) for a, b in zip(budgeted.state_dict().values(),
                                                 fixed.state_dict().values(), strict=True))
    # a resumed budget run keeps its count (no second probe) and its record
    assert train(tiny_cfg, DiffusionConfig(), TrainConfig(), tmp_path / "b", resume=True,
                 progress=False)["note"] == "already finished" and probes == [32]
    summary = train(tiny_cfg, DiffusionConfig(), TrainConfig(minutes=0.1, steps=3, **FAST),
                    tmp_path / "o", progress=False)
    assert summary["steps"] == 3 and probes == [32]
    assert "budget" not in json.loads((tmp_path / "o" / "config.json").read_text())


def test_the_real_probe_leaves_the_run_as_a_steps_run_and_trains_a_throwaway(tmp_path,
                                                                             tiny_cfg):
    """train() probes a throwaway method (its weights trained, one loss per step), so a budget
    run's weights are those of the same count given as --steps, bit for bit."""
    images = load_split("mnist", "train")[0][:64]
    method = train_mod.Training(tiny_cfg, DiffusionConfig(), TrainConfig(**FAST), 1, {},
                                loop.World(), torch.device("cpu"))
    before = [p.detach().clone() for p in method.model.parameters()]
    calls = []
    method.loss = lambda *a, _f=method.loss: calls.append(1) or _f(*a)
    loop.seconds_per_step(method, loop.Run(tmp_path, images, None, torch.device("cpu"), "fp32"),
                          steps=3, warmup=2)
    after = list(method.model.parameters())
    assert len(calls) == 5 and any(not torch.equal(a, b)
                                   for a, b in zip(before, after, strict=True))
    summary = train(tiny_cfg, DiffusionConfig(), TrainConfig(minutes=0.01, **FAST),
                    tmp_path / "b", progress=False)
    steps = json.loads((tmp_path / "b" / "config.json").read_text())["budget"]["steps"]
    assert summary["steps"] == steps
    train(tiny_cfg, DiffusionConfig(), TrainConfig(steps=steps, **FAST), tmp_path / "s",
          progress=False)
    budgeted, fixed = load_checkpoint(tmp_path / "b")[0], load_checkpoint(tmp_path / "s")[0]
    assert all(torch.equal(a, b) for a, b in zip(budgeted.state_dict().values(),
                                                 fixed.state_dict().values(), strict=True))


def test_a_line_cut_short_in_the_metrics_log_does_not_stop_a_resume(tmp_path, tiny_cfg):
    """A crash (or a full disk) mid-line leaves a partial last line; resume drops it."""
    cfg = TrainConfig(steps=20, checkpoint_every=10, **FAST)
    train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "r", progress=False)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')
    assert train(tiny_cfg, DiffusionConfig(), cfg, tmp_path / "r", resume=True,
                 progress=False)["note"] == "already finished"
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [10, 20]
