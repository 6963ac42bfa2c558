"""How fast does a training recipe converge? Pseudo-FID against images seen, one factor at a time.

Run: .venv/bin/python benchmarks/convergence.py --preset reduced [--variants today lr2e-3 ...]
                                                [--seeds 0] [--images 60000] [--eval-n 2000]
  -> runs/convergence/<preset>/<variant>-s<seed>/  (ordinary, resumable `minidiff train` runs)
  -> benchmarks/results/convergence.{json,md,png}

Every variant changes one thing of today's recipe (``today``: the recipe the shipped 3-epoch
models were trained with, ``minidiff.study.reference.TRAINING`` / ``DIFFUSION``, which
``minidiff train --original-recipe`` trains) or combines the winners, and every one sees the same
number of images (default 60,000: one third of the shipped models' 3 epochs). Each run is
evaluated during training (``--eval-every``: pseudo-FID of n samples of the EMA weights, 8
steps of the default sampler, seed 0) at a quarter, half, three quarters and all of the budget.
The target is today's 3-epoch pseudo-FID: the shipped model of the preset evaluated the same
way. Finished runs are kept, so an interrupted benchmark continues where it stopped; results of
earlier invocations are merged into the JSON.

The curves are evaluated at 8 steps, cheap enough to repeat during training. ``--rescore``
evaluates again, at the default sampler (``SamplingConfig()``), the 3-epoch models the targets
came from (read from git history, commit ``TARGET_COMMIT``) and the kept checkpoints (EMA weights)
of the named variants' runs: -> benchmarks/results/convergence-rescored.{json,md}

  .venv/bin/python benchmarks/convergence.py --preset reduced --rescore \
      --variants v+lr2e-3+bs64+warmup50+cosine --seeds 0 1
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)
import torch
from safetensors.torch import load_file

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.diffusion import DiffusionConfig  # noqa: E402
from minidiff.evaluation import Evaluator  # noqa: E402
from minidiff.files import atomic_write_text  # noqa: E402
from minidiff.runtime import environment, resolve_device  # noqa: E402
from minidiff.settings import SamplingConfig, TrainConfig  # noqa: E402
from minidiff.study import PRESETS as STUDY_PRESETS  # noqa: E402
from minidiff.study.reference import DIFFUSION, TRAINING  # noqa: E402
from minidiff.train import train  # noqa: E402
from minidiff.unet import PRESETS  # noqa: E402

# name -> (what it changes, TrainConfig overrides, DiffusionConfig overrides)
VARIANTS = {
    "today": ("today's recipe: lr 1e-3, 200 warm-up steps, cosine to 0.1 lr, batch 128, EMA "
              "0.999 with (1+s)/(10+s) warm-up, eps, plain MSE", {}, {}),
    "ema-p2/3": ("EMA power-law warm-up, power 2/3", {"ema_power": 2 / 3}, {}),
    "ema-p3/4": ("EMA power-law warm-up, power 3/4", {"ema_power": 3 / 4}, {}),
    "lr2e-3": ("peak lr 2e-3", {"lr": 2e-3}, {}),
    "lr4e-3": ("peak lr 4e-3", {"lr": 4e-3}, {}),
    "bs64": ("batch 64 (twice the steps)", {"batch_size": 64}, {}),
    "bs256": ("batch 256 (half the steps)", {"batch_size": 256}, {}),
    "min-snr": ("min-SNR-5 loss weighting", {"loss_weighting": "min-snr"}, {}),
    "v": ("v-prediction", {}, {"prediction": "v"}),
    "warmup50": ("50 warm-up steps instead of 200", {"warmup_steps": 50}, {}),
    # tried once the single factors above had been combined
    "bs32": ("batch 32 (four times the steps)", {"batch_size": 32}, {}),
    "cosine": ("cosine noise schedule (Nichol & Dhariwal 2021)", {}, {"schedule": "cosine"}),
}
POINTS = (0.25, 0.5, 0.75, 1.0)
# what the numbers cannot say by themselves
NOTES = ["Train img/s is wall-clock information only (the x-axis is images seen): the runs "
         "`v+lr2e-3+bs64+warmup50+cosine` and `v+lr2e-3+bs64+warmup50+ema-p3/4` of `reduced`, "
         "seed 0, shared the two cores with a test run, which slowed them 2-4x. A final EMA "
         "decay of 0.9995 / 0.9999 was not tried: at this budget (469-1,875 steps) the "
         "warm-up `(1 + s) / (10 + s)` stays below 0.999 to the end, so the final decay never "
         "takes effect; it matters for the long runs of the study."]
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# the last commit whose shipped models are the 3-epoch ones of the targets
TARGET_COMMIT = "e95e731"
RUNS = Path(__file__).resolve().parents[1] / "runs" / "convergence"


def combine(names: str) -> tuple[str, dict, dict]:
    """``a+b+c``: today's recipe with the named variants' changes."""
    what, t, d = [], dict(TRAINING), dict(DIFFUSION)
    for name in names.split("+"):
        w, tt, dd = VARIANTS[name]
        what.append(w)
        t.update(tt)
        d.update(dd)
    return "; ".join(what), t, d


def run(preset: str, variant: str, seed: int, images: int, eval_n: int) -> dict:
    what, t_over, d_over = combine(variant)
    bs = t_over["batch_size"]
    steps = images // bs
    cfg = TrainConfig(steps=steps, seed=seed, eval_n=eval_n, eval_raw=variant == "today",
                      eval_every=tuple(round(p * steps) for p in POINTS), checkpoint_every=250,
                      **t_over)
    out = RUNS / preset / (f"{variant.replace('/', '')}-s{seed}"
                           + ("" if images == 60_000 else f"-{images}"))
    resume = (out / "config.json").is_file()
    summary = train(PRESETS[preset], DiffusionConfig(**d_over), cfg, out, resume=resume,
                    preset=preset)
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    points = [{k: r[k] for k in ("step", "images_seen", "train_flops", "train_s")}
              | {"pseudo_fid": r["eval"]["pseudo_fid"], "confidence": r["eval"]["confidence"]}
              | ({"raw_pseudo_fid": r["eval_raw"]["pseudo_fid"]} if "eval_raw" in r else {})
              for r in evals if "eval" in r]
    return {"preset": preset, "variant": variant, "seed": seed, "what": what,
            "train": cfg.to_dict(), "diffusion": DiffusionConfig(**d_over).to_dict(),
            "images": steps * bs, "points": points, "final": points[-1]["pseudo_fid"],
            "img_per_s": round(steps * bs / points[-1]["train_s"], 1),
            "precision": summary.get("precision")}


def target(preset: str, eval_n: int) -> dict:
    """Today's 3-epoch pseudo-FID: the shipped model of ``preset``, evaluated like the runs."""
    model, config, digest = load_checkpoint(preset)
    ev = Evaluator(DiffusionConfig.from_dict(config["diffusion"]), eval_n,
                   device=resolve_device("auto"))
    base = STUDY_PRESETS["standard"].base_epochs  # the shipped models' `minidiff study` preset
    t = config["train"]
    images = (base + (t["epochs"] if t.get("init") else 0)) * 60000
    note = "" if not t.get("init") else (
        f" (then fine-tuned {t['epochs']} epochs at lr {t['lr']:g})")
    return {"checkpoint": preset, "sha256": digest, **ev(model),
            "what": f"shipped `{preset}`: {base:g} epochs of today's recipe{note}",
            "images": images}


def first_below(points: list[dict], value: float) -> int | None:
    hit = [p["images_seen"] for p in points if p["pseudo_fid"] <= value]
    return min(hit) if hit else None


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# Convergence: pseudo-FID against images seen, one factor at a time",
        "",
        f"Command: `{res['command']}` (`benchmarks/convergence.py`; runs in "
        "`runs/convergence/`). "
        f"Machine: {env['cpu']} (capability {env['cpu_capability']}, bf16 native: "
        f"{env['bf16_native']}), {env['threads']} threads, torch "
        f"{env['torch']}; date {env['date']}.",
        "",
        f"Each point: pseudo-FID of n = {res['eval_n']} samples of the EMA weights (8 steps "
        "of the default sampler, seed 0) against the MNIST test split (`minidiff train "
        "--eval-every`). Every variant sees the same number of images. The target is today's "
        "3-epoch model evaluated the same way; \"reached at\" is the first evaluated point at "
        "or below it.",
        "",
    ]
    for preset, tgt in res["targets"].items():
        rows = [r for r in res["runs"].values() if r["preset"] == preset]
        if not rows:
            continue
        lines += [f"## `{preset}`", "",
                  f"Target: {tgt['what']}, {tgt['images']:,.0f} images: pseudo-FID "
                  f"**{tgt['pseudo_fid']:.3f}** (confidence {tgt['confidence']:.3f}).", "",
                  "| variant | change | images | seeds | pseudo-FID at " + " / ".join(
                      f"{p:.0%}" for p in POINTS) + " | final (mean) | reached target at "
                  "| train img/s |",
                  "|---|---|---|---|---|---|---|---|"]
        by_variant: dict[tuple, list] = {}
        for r in rows:
            by_variant.setdefault((r["variant"], r["images"]), []).append(r)
        for (variant, images), rs in sorted(
                by_variant.items(), key=lambda kv: (round(kv[0][1], -4), statistics.mean(
                    r["final"] for r in kv[1]))):
            curve = " / ".join(f"{statistics.mean(r['points'][k]['pseudo_fid'] for r in rs):.3f}"
                               for k in range(len(rs[0]["points"])))
            reached = [first_below(r["points"], tgt["pseudo_fid"]) for r in rs]
            reached_s = ", ".join("not reached" if x is None else f"{x:,}" for x in reached)
            final = statistics.mean(r["final"] for r in rs)
            finals = ", ".join(f"{r['final']:.3f}" for r in rs)
            spread = f" ({finals})" if len(rs) > 1 else ""
            lines.append(f"| `{variant}` | {rs[0]['what']} | {images:,} | {len(rs)} | {curve} | "
                         f"{final:.3f}{spread} | {reached_s} | "
                         f"{statistics.median(r['img_per_s'] for r in rs):.0f} |")
        raw = [r for r in rows if r["variant"] == "today" and "raw_pseudo_fid" in r["points"][-1]]
        if raw:
            lines += ["", "Control, raw (non-EMA) weights of `today`: " + " / ".join(
                f"{p['raw_pseudo_fid']:.3f}" for p in raw[0]["points"]) + "."]
        lines.append("")
    lines += [*NOTES, "", "![curves](convergence.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = [p for p in res["targets"] if any(r["preset"] == p for r in res["runs"].values())]
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        for r in sorted((r for r in res["runs"].values() if r["preset"] == preset),
                        key=lambda r: (r["variant"], r["seed"])):
            xs = [p["images_seen"] for p in r["points"]]
            ax.plot(xs, [p["pseudo_fid"] for p in r["points"]], marker="o", ms=3,
                    label=f"{r['variant']} s{r['seed']} {r['images'] // 1000}k")
        ax.axhline(res["targets"][preset]["pseudo_fid"], color="k", ls="--",
                   label="today, 3 epochs")
        ax.set(xlabel="images seen", ylabel=f"pseudo-FID (n={res['eval_n']})", yscale="log",
               title=preset)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def old_shipped(preset: str, folder: Path) -> Path:
    """The shipped ``preset`` of ``TARGET_COMMIT``, written to ``folder`` (needs git history)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        blob = subprocess.run(["git", "show", f"{TARGET_COMMIT}:src/minidiff/assets/models/"
                               f"{preset}/{name}"], cwd=ROOT, capture_output=True, check=True)
        (folder / name).write_bytes(blob.stdout)
    return folder


def rescore(preset: str, variants: list[str], seeds: list[int], eval_n: int) -> dict:
    """The target model and every kept checkpoint of the runs, at today's default sampler."""
    sampling, device = SamplingConfig(), resolve_device("auto")

    def score(model, config) -> dict:
        ev = Evaluator(DiffusionConfig.from_dict(config["diffusion"]), eval_n,
                       sampling=sampling, device=device)
        return {k: round(v, 4) for k, v in ev(model).items() if k != "n"}

    with tempfile.TemporaryDirectory() as tmp:
        model, config, digest = load_checkpoint(old_shipped(preset, Path(tmp) / preset))
        out = {"sampling": sampling.to_dict(), "eval_n": eval_n,
               "target": {"commit": TARGET_COMMIT, "sha256": digest, **score(model, config)},
               "runs": {}}
    print(preset, "target", out["target"], flush=True)
    for variant in variants:
        bs = combine(variant)[1]["batch_size"]
        for seed in seeds:
            run_dir = RUNS / preset / f"{variant.replace('/', '')}-s{seed}"
            model, config, _ = load_checkpoint(run_dir)
            steps = config["train"]["steps"]
            points = [{"step": steps, "images_seen": steps * bs, **score(model, config)}]
            for ckpt in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
                step = int(ckpt.name.split("-")[1])
                if step == steps:
                    continue
                tensors = load_file(ckpt / "state.safetensors")
                model.load_state_dict({k[4:]: v for k, v in tensors.items() if k[:4] == "ema."})
                with torch.no_grad():
                    points.append({"step": step, "images_seen": step * bs,
                                   **score(model, config)})
            points.sort(key=lambda p: p["step"])
            out["runs"][f"{variant}/s{seed}"] = points
            print(preset, variant, seed, points, flush=True)
    return out


def rescored_markdown(res: dict) -> str:
    env = res["environment"]
    s = next(iter(res["presets"].values()))["sampling"]
    lines = [
        "# Convergence, re-scored at today's default sampler",
        "",
        "Commands: " + "; ".join(f"`{r['command']}`" for r in res["presets"].values())
        + f". Machine: {env['cpu']} (capability {env['cpu_capability']}, bf16 native: "
        f"{env['bf16_native']}), {env['threads']} threads, torch {env['torch']}; date "
        f"{env['date']}.",
        "",
        "The curves of [convergence.md](convergence.md) were evaluated at 8 steps, the default "
        "sampler of their day. The default is now "
        f"{s['sampler']} {s['spacing']} {s['steps']} steps (`SamplingConfig()`, "
        "[default_sampler-reduced.md](default_sampler-reduced.md)); here the targets (the "
        f"shipped 3-epoch models of commit `{TARGET_COMMIT}`) and the kept checkpoints (EMA "
        "weights) of the winning recipe are evaluated again at it: same n, seed 0, same "
        "reference (MNIST test split). The goal: the new recipe reaches the target in at most "
        "one third of the target's images seen.",
        "",
    ]
    for preset, r in res["presets"].items():
        tgt, images = r["target"], res["target_images"][preset]
        old = res["eight_steps"][preset]
        lines += [f"## `{preset}`", "",
                  f"Target at the default sampler: **{tgt['pseudo_fid']:.3f}** (confidence "
                  f"{tgt['confidence']:.3f}) after {images:,.0f} images; one third is "
                  f"{images / 3:,.0f} images. At 8 steps ([convergence.md](convergence.md)): "
                  f"target {old['target']:.3f}, the runs' last points "
                  + ", ".join(f"{v:.3f}" for v in old["final"]) + ".", "",
                  "| run | images seen | pseudo-FID | confidence | at or below target |",
                  "|---|---|---|---|---|"]
        for key, points in r["runs"].items():
            for p in points:
                ok = "yes" if p["pseudo_fid"] <= tgt["pseudo_fid"] else "no"
                lines.append(f"| `{key}` | {p['images_seen']:,} | {p['pseudo_fid']:.3f} | "
                             f"{p['confidence']:.3f} | {ok} |")
        last = statistics.mean(points[-1]["pseudo_fid"] for points in r["runs"].values())
        lines += ["", f"The runs' last point (mean) is {last / tgt['pseudo_fid']:.2f}x the target "
                  f"here, {statistics.mean(old['final']) / old['target']:.2f}x at 8 steps.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["reduced", "baseline"], required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="names of VARIANTS, or a+b to combine them")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--rescore", action="store_true",
                    help="evaluate the target and the runs' checkpoints at today's default "
                    "sampler (no training)")
    args = ap.parse_args()
    if args.rescore:
        path = RESULTS / "convergence-rescored.json"
        res = json.loads(path.read_text()) if path.is_file() else {"presets": {}}
        res["presets"][args.preset] = rescore(args.preset, args.variants, args.seeds,
                                              args.eval_n)
        res["presets"][args.preset]["command"] = ("python benchmarks/convergence.py "
                                                  + " ".join(sys.argv[1:]))
        res["environment"] = environment()
        curves = json.loads((RESULTS / "convergence.json").read_text())
        res["target_images"] = {p: t["images"] for p, t in curves["targets"].items()}
        res["eight_steps"] = {p: {"target": curves["targets"][p]["pseudo_fid"], "final": [
            r["final"] for r in curves["runs"].values() if r["preset"] == p
            and r["variant"] in args.variants and r["images"] == 59_968]}
            for p in res["presets"]}
        atomic_write_text(path, json.dumps(res, indent=1) + "\n")
        atomic_write_text(RESULTS / "convergence-rescored.md", rescored_markdown(res))
        return
    for v in args.variants:
        combine(v)  # unknown names fail before any training
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "convergence.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    if res.get("eval_n") != args.eval_n:
        res = {"eval_n": args.eval_n, "targets": {}, "runs": {}}
    res["environment"] = environment()
    res["command"] = "python benchmarks/convergence.py " + " ".join(sys.argv[1:])
    if args.preset not in res["targets"]:
        res["targets"][args.preset] = target(args.preset, args.eval_n)
    for seed in args.seeds:
        for variant in args.variants:
            key = f"{args.preset}/{variant}/s{seed}" + (
                "" if args.images == 60_000 else f"/{args.images}")
            if key in res["runs"]:
                continue
            res["runs"][key] = run(args.preset, variant, seed, args.images, args.eval_n)
            atomic_write_text(path, json.dumps(res, indent=1) + "\n")
            atomic_write_text(RESULTS / "convergence.md", markdown(res))
            plot(res, RESULTS / "convergence.png")
            print(key, f"final pseudo-FID {res['runs'][key]['final']:.3f}", flush=True)
    atomic_write_text(path, json.dumps(res, indent=1) + "\n")
    atomic_write_text(RESULTS / "convergence.md", markdown(res))
    plot(res, RESULTS / "convergence.png")


if __name__ == "__main__":
    main()
