"""Which training recipe gives the best model for the same CPU seconds? The demo's question.

Run: .venv/bin/python benchmarks/equal_time.py [--seconds 150] [--variants today bs32 ...]
                                              [--seeds 0 1] [--n 1000] [--sample-seeds 0 1]
  -> runs/equal_time/<seconds>s/<variant>-s<seed>/  (ordinary, resumable `minidiff train` runs)
  -> benchmarks/results/equal_time.{json,md}

The sibling of ``convergence.py``, which compares recipes at equal *images*: here every variant
gets the same training *seconds* on this machine, so a variant that changes the cost of a step
(batch size, width) trains for proportionally fewer or more steps. The seconds per step are
measured once per (preset, batch size), as ``minidiff train --minutes`` probes them (median of
20 steps after 5, :func:`minidiff.loop.seconds_per_step`), and every variant with that cost
trains the same count, so the comparison is deterministic given the counts (recorded). Each run
is scored at :data:`RULER` (the default sampler when the rows were made), n samples per
sampling seed against the MNIST test split: pseudo-FID and classifier confidence, mean and
min..max over training seeds x sampling seeds.

``today`` is the demo's recipe (``TrainConfig()`` on the ``reduced`` U-Net). Results of earlier
invocations at the same seconds are merged into the JSON; finished runs are kept and reused.
"""

import argparse
import copy
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import common
import torch

from minidiff.checkpoint import load_checkpoint, load_state
from minidiff.diffusion import DiffusionConfig
from minidiff.evaluation import score
from minidiff.files import atomic_write_text
from minidiff.loop import Run, seconds_per_step, training_images
from minidiff.metrics import Reference
from minidiff.runtime import cpu_class, environment, resolve_precision
from minidiff.settings import SamplingConfig, TrainConfig
from minidiff.train import Training, train
from minidiff.unet import PRESETS, UNetConfig

# name -> (what it changes, preset, TrainConfig overrides, DiffusionConfig overrides)
VARIANTS = {
    "today": ("the demo's recipe: reduced U-Net, v-prediction, cosine schedule, batch 64, "
              "lr 2e-3, EMA 0.999 with (1+s)/(10+s) warm-up, uniform t, plain MSE on v",
              "reduced", {}, {}),
    "bs32": ("batch 32 (more, cheaper steps)", "reduced", {"batch_size": 32}, {}),
    "bs128": ("batch 128 (fewer, dearer steps)", "reduced", {"batch_size": 128}, {}),
    "lr4e-3": ("peak lr 4e-3", "reduced", {"lr": 4e-3}, {}),
    "min-snr": ("min-SNR-5 weighting (Hang et al. 2023) on the v loss", "reduced",
                {"loss_weighting": "min-snr"}, {}),
    "lognormal": ("EDM's log-normal noise levels, log sigma ~ N(-1.2, 1.2)", "reduced",
                  {"noise_levels": "lognormal"}, {}),
    "edm": ("EDM's noise levels and loss weighting (sigma_data 0.5; Karras et al. 2022)",
            "reduced", {"noise_levels": "lognormal", "loss_weighting": "edm"}, {}),
    "lognormal-hi": ("log-normal noise levels centred higher, log sigma ~ N(0.5, 1.5) "
                      "(uniform timesteps of the cosine schedule: mean 0, std 1.5)", "reduced",
                      {"noise_levels": "lognormal", "level_mean": 0.5, "level_std": 1.5}, {}),
    "edm-weight": ("EDM's loss weighting (sigma_data 0.5) on uniform timesteps", "reduced",
                   {"loss_weighting": "edm"}, {}),
    "ema-std0.05": ("EDM2's power EMA, relative width 0.05", "reduced", {"ema_std": 0.05}, {}),
    "ema-std0.10": ("EDM2's power EMA, relative width 0.10", "reduced", {"ema_std": 0.10}, {}),
    "ema-std0.20": ("EDM2's power EMA, relative width 0.20", "reduced", {"ema_std": 0.20}, {}),
    "lr-min0": ("cosine learning rate down to 0 (not to 0.1 lr)", "reduced",
                {"lr_min_ratio": 0.0}, {}),
    "baseline": ("the wider baseline U-Net (32/64/128)", "baseline", {}, {}),
    "narrow": ("a narrower U-Net (8/16/32)", "c8-16-32", {}, {}),
    "attention": ("self-attention at 7 x 7 between the bottleneck blocks", "reduced-attention",
                  {}, {}),
    "shallow": ("the shallow U-Net (64/128)", "shallow", {}, {}),
    "cond": ("class-conditional (10% of labels dropped), scored on 100 digits per class drawn "
             "with the default guidance", "reduced-cond", {}, {}),
}
RUNS = Path(__file__).resolve().parents[1] / "runs" / "equal_time"
# every committed row was scored with 20 trailing steps of SDE-DPM-Solver++ (the default sampler
# until 2026-12-06), so new rows keep that ruler
RULER = SamplingConfig(steps=20, spacing="trailing")


def variant(names: str) -> tuple[str, str, dict, dict]:
    """``a+b``: the demo's recipe with the named variants' changes (the last preset named)."""
    whats, preset, t_over, d_over = [], "reduced", {}, {}
    for name in names.split("+"):
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} (join with +)")
        what, p, t, d = VARIANTS[name]
        whats.append(what)
        preset = p if p != "reduced" else preset
        t_over, d_over = {**t_over, **t}, {**d_over, **d}
    return "; ".join(whats), preset, t_over, d_over


def unet_config(preset: str) -> UNetConfig:
    """A preset's U-Net, ``reduced-attention``: with self-attention, ``reduced-cond``:
    class-conditional, or ``c8-16-32``: one with those channels per level."""
    if preset in PRESETS:
        return PRESETS[preset]
    if preset.endswith("-cond"):
        return replace(PRESETS[preset.removesuffix("-cond")], num_classes=10)
    if preset.endswith("-attention"):
        return replace(PRESETS[preset.removesuffix("-attention")], attention=True)
    return UNetConfig(channels=tuple(int(c) for c in preset[1:].split("-")))


def per_step(preset: str, cfg: TrainConfig, precision: str, cache: dict) -> float:
    key = f"{preset}/bs{cfg.batch_size}"
    if key not in cache:
        images, labels = training_images(cfg.dataset, 4096, 28)
        conditional = unet_config(preset).num_classes is not None
        run = Run(Path("/nonexistent"), images, labels if conditional else None,
                  torch.device("cpu"), precision, progress=False)
        probe = Training(unet_config(preset), DiffusionConfig(), replace(cfg, eval_every=None), 1,
                         {}, run.world, run.device)
        cache[key] = round(seconds_per_step(probe, run), 5)
        print(f"{key}: {cache[key] * 1000:.1f} ms per step", flush=True)
    return cache[key]


def run_variant(name: str, seed: int, seconds: float, precision: str, cache: dict,
                ref: Reference, n: int, sample_seeds: list[int]) -> dict:
    what, preset, t_over, d_over = variant(name)
    base = replace(TrainConfig(), seed=seed, checkpoint_every=500, **t_over)
    steps = max(1, round(seconds / per_step(preset, base, precision, cache)))
    cfg = replace(base, steps=steps)
    out = RUNS / f"{seconds:g}s" / f"{name.replace('/', '')}-s{seed}"
    resume = (out / "config.json").is_file()
    summary = train(unet_config(preset), DiffusionConfig(**d_over), cfg, out, resume=resume,
                    preset=preset if preset in PRESETS else None, progress=False)
    model, config, digest = load_checkpoint(out)
    scores = [score(model, config, replace(RULER, seed=s), n, ref, y=common.as_drawn(model, n))
              for s in sample_seeds]
    raw = raw_scores(out, ref, n, sample_seeds)
    return {"variant": name, "seed": seed, "what": what, "preset": preset, "steps": steps,
            "images": steps * cfg.batch_size, "s_per_step": cache[f"{preset}/bs{cfg.batch_size}"],
            "train_wall_s": round(summary.get("seconds", float("nan")), 1),
            "sha256": digest, "train": cfg.to_dict(),
            "diffusion": DiffusionConfig(**d_over).to_dict(),
            "pseudo_fid": [s["pseudo_fid"] for s in scores],
            "confidence": [s["confidence"] for s in scores], **raw,
            **({"conditional_accuracy": [s["conditional_accuracy"] for s in scores]}
               if "conditional_accuracy" in scores[0] else {})}


def raw_scores(out: Path, ref: Reference, n: int, sample_seeds: list[int]) -> dict:
    """The scores of the run's last raw (not averaged) weights: its newest training state."""
    ema, config, _ = load_checkpoint(out)
    raw = copy.deepcopy(ema)
    load_state(out, raw, copy.deepcopy(ema), torch.optim.AdamW(raw.parameters()))
    scores = [score(raw.eval(), config, replace(RULER, seed=s), n, ref, y=common.as_drawn(raw, n))
              for s in sample_seeds]
    return {"raw_pseudo_fid": [s["pseudo_fid"] for s in scores],
            "raw_confidence": [s["confidence"] for s in scores]}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Recipes at equal training seconds ({res['seconds']:g} s, {env['cpu']}, "
             f"{cpu_class()}, {res['precision']}, {env['date']})", "",
             f"Command: `python benchmarks/equal_time.py --seconds {res['seconds']:g} "
             "--variants V ... --seeds S ...` for the rows below (each invocation adds its rows; "
             f"the last was `{res['command']}`; runs in `runs/equal_time/`). torch "
             + env["torch"] + f", {env['threads']} threads.", "",
             f"Every variant trains for {res['seconds']:g} s of this CPU: its steps are the "
             "seconds over its measured seconds per step. Scores: the default sampler until "
             f"2026-12-06 (SDE-DPM-Solver++, 20 trailing steps), n = {res['n']} per sampling seed "
             f"{res['sample_seeds']}, mean (min..max) over training seeds x sampling seeds.", "",
             "| variant | change | steps x batch | training seeds | pseudo-FID | confidence | "
             "pseudo-FID, raw weights | confidence, raw |",
             "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in res["rows"]:
        by.setdefault(r["variant"], []).append(r)
    order = sorted(by, key=lambda v: statistics.mean(x for r in by[v] for x in r["pseudo_fid"]))
    for v in order:
        rows = by[v]
        fid = [x for r in rows for x in r["pseudo_fid"]]
        conf = [x for r in rows for x in r["confidence"]]
        raw = [x for r in rows for x in r.get("raw_pseudo_fid", [])]
        raw_conf = [x for r in rows for x in r.get("raw_confidence", [])]
        lines.append(f"| `{v}` | {rows[0]['what']} | {rows[0]['steps']:,} x "
                     f"{rows[0]['train']['batch_size']} | "
                     f"{', '.join(str(r['seed']) for r in rows)} | {spread(fid)} | "
                     f"{spread(conf)} | {spread(raw) if raw else ''} | "
                     f"{spread(raw_conf) if raw_conf else ''} |")
    lines += ["", "Seconds per step (probe): " + ", ".join(
        f"{k} {v * 1000:.1f} ms" for k, v in res["s_per_step"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--variants", nargs="+", default=["today"],
                    help=f"of {', '.join(VARIANTS)}, or several joined by +")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sample-seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--name", default="equal_time", help="results file stem")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON")
    args = ap.parse_args()
    precision = resolve_precision("auto", torch.device("cpu"))
    path = common.RESULTS / f"{args.name}.json"
    if args.markdown_only:
        atomic_write_text(path.with_suffix(".md"), markdown(json.loads(path.read_text())))
        return
    res = json.loads(path.read_text()) if path.is_file() else {}
    if (res.get("seconds"), res.get("n"), res.get("precision")) != (args.seconds, args.n,
                                                                     precision):
        res = {"seconds": args.seconds, "n": args.n, "precision": precision, "rows": [],
               "s_per_step": {}}
    res.update(command="python benchmarks/equal_time.py " + " ".join(sys.argv[1:]),
               sample_seeds=args.sample_seeds, environment=environment())
    for v in args.variants:
        variant(v)  # an unknown one stops the run before anything trains
    ref = Reference("mnist", "test")
    for r in res["rows"]:  # rows scored before the raw weights were
        if "raw_pseudo_fid" not in r:
            r.update(raw_scores(RUNS / f"{args.seconds:g}s" / f"{r['variant']}-s{r['seed']}",
                                ref, args.n, args.sample_seeds))
    for v in args.variants:
        for seed in args.seeds:
            if any(r["variant"] == v and r["seed"] == seed for r in res["rows"]):
                continue
            row = run_variant(v, seed, args.seconds, precision, res["s_per_step"], ref, args.n,
                              args.sample_seeds)
            res["rows"].append(row)
            print(v, seed, row["steps"], row["pseudo_fid"], row["confidence"], flush=True)
            atomic_write_text(path, json.dumps(res, indent=2) + "\n")
            atomic_write_text(path.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
