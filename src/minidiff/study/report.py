"""The study's report: ``report.md`` with the study-style table (the study's own numbers in a
column beside ours), a sample grid per model, quality-vs-size and quality-vs-latency plots and
the digit-balance chart, all written from ``results.json`` (and ``curves.json``: the
quality-vs-compute curves and what they say at equal compute and at equal epochs)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

from ..files import atomic_write_text
from ..unet import PRESETS, UNet, count_macs, count_params
from .reference import EPOCHS, RECIPES, STUDY

FIGURES = "figures"


def _plots(out: Path, rows: list[dict], dataset: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / FIGURES
    fig_dir.mkdir(exist_ok=True)
    floor = rows[0]["floor"]["pseudo_fid"]
    written = []
    for key, xlabel, name in (("size_mb", "size on disk (MiB)", "quality_vs_size.png"),
                              ("latency_10k_s", "time for 10,000 samples (s)",
                               "quality_vs_latency.png")):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        markers = "osD^vP*X"
        for k, r in enumerate(rows):  # a legend, not labels: copies of one model sit close
            ax.scatter(r[key], r["pseudo_fid"], s=45, marker=markers[k % len(markers)],
                       label=r["model"])
        ax.axhline(floor, ls="--", c="gray", lw=1, label=f"real-data floor ({floor:.3f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pseudo-FID (lower is better)")
        ax.set_ylim(0, 1.15 * max(r["pseudo_fid"] for r in rows))
        ax.set_xlim(0, 1.2 * max(r[key] for r in rows))
        ax.legend(fontsize=8, loc="lower right", ncol=2)
        ax.set_title(f"{dataset}: {rows[0]['sampler']}, {rows[0]['steps']} steps, "
                     f"n = {rows[0]['n']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        ax.bar(np.arange(10) + (k - len(rows) / 2 + 0.5) * width, r["class_histogram"],
               width, label=r["model"])
    ax.axhline(0.1, ls="--", c="gray", lw=1, label="balanced (0.1)")
    ax.set_xticks(range(10))
    ax.set_xlabel("class assigned by the shipped classifier")
    ax.set_ylabel("share of samples")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(fig_dir / "class_balance.png", dpi=120)
    plt.close(fig)
    written.append("class_balance.png")
    return written


def _curve_plot(out: Path, points: list[dict]) -> str:
    """Pseudo-FID during training against training compute and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "train_flops", "training compute (FLOPs: 6 x MACs x images)"),
                           (axes[1], "train_s", "training seconds (as measured; see devices)")):
        for m in models:
            pts = [p for p in points if p["model"] == m]
            ax.plot([p[key] for p in pts], [p["pseudo_fid"] for p in pts], marker="o", ms=3,
                    label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", lw=0.3)
    axes[0].set_ylabel(f"pseudo-FID of the EMA weights (n = {points[0]['n']:,})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    name = "quality_vs_compute.png"
    fig.savefig(out / FIGURES / name, dpi=120)
    plt.close(fig)
    return name


def value_at(points: list[dict], model: str, key: str, x: float) -> float | None:
    """``model``'s pseudo-FID at ``key`` = ``x``, interpolated log-log between its curve's
    points; None outside the curve."""
    pts = sorted((p[key], p["pseudo_fid"]) for p in points if p["model"] == model)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return pts[-1][1] if pts and math.isclose(pts[-1][0], x, rel_tol=1e-6) else None


def _curve_findings(points: list[dict]) -> list[str]:
    """Which architecture is best at equal training compute and which at equal epochs, read
    from the from-scratch curves (fine-tuning excluded; pruned has none of its own)."""
    scratch = [p for p in points if p["stage"] in ("baseline", "reduced", "shallow")
               and p["model"] == p["stage"]]
    archs = list(dict.fromkeys(p["model"] for p in scratch))
    if len(archs) < 2:
        return []

    def at(key: str, x: float) -> str | None:
        """The models whose curves reach ``x``, best first; None if fewer than two do."""
        vals = {m: value_at(scratch, m, key, x) for m in archs}
        ranked = sorted((v, m) for m, v in vals.items() if v is not None)
        short = [m for m, v in vals.items() if v is None]
        if len(ranked) < 2:
            return None
        return (", ".join(f"{m} {v:.3f}" for v, m in ranked)
                + (f" ({', '.join(short)} trained less)" if short else ""))

    n = scratch[0]["n"]
    flops = min(max(p["train_flops"] for p in scratch if p["model"] == m) for m in archs)
    ranked = at("train_flops", flops)
    lines = [f"- **At equal training compute** ({flops:.2e} FLOPs from scratch): {ranked} "
             f"(pseudo-FID at n = {n:,} during training, best first)."] if ranked else []
    for m in archs:  # each model's own budget in epochs, the others read off their curves
        epochs = max(p["epochs"] for p in scratch if p["model"] == m)
        ranked = at("epochs", epochs)
        if ranked:
            lines.append(f"- **At equal epochs** ({epochs:.2f}, {m}'s budget): {ranked}.")
    return lines


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _discussion(rows: dict[str, dict], best: str) -> list[str]:
    """Statements computed from the numbers, set against the study's findings."""
    b = rows["baseline"]
    equal = b.get("equal_compute", False)  # reduced / shallow trained the baseline's FLOPs
    sb, sp, sr, ss = (STUDY[k] for k in ("baseline", "pruned", "reduced", "shallow"))
    lines = []
    if "reduced" in rows:
        r = rows["reduced"]
        better = r["pseudo_fid"] < b["pseudo_fid"]
        lines.append(
            f"- **Reduced vs baseline.** The study found reduced far better on MNIST (pseudo-FID "
            f"{sr['pseudo_fid']} vs {sb['pseudo_fid']}). Here reduced scores "
            f"{r['pseudo_fid']:.3f} against baseline's "
            f"{b['pseudo_fid']:.3f}: {'it agrees' if better else 'it disagrees'} at this "
            f"budget, with {r['params'] / b['params']:.0%} of the parameters. Both trained "
            + ("the same FLOPs from scratch (reduced "
               f"{b['macs'] / r['macs']:.1f}x the baseline's images)," if equal else
               "for the same epochs from scratch (reduced")
            + f" then fine-tuned briefly at lr {RECIPES['reduced']['lr']:g}, as in the study"
            + (". " if equal else "). ")
            + f"The study's {sb['pseudo_fid']} "
            f"for a {EPOCHS}-epoch baseline is "
            "hard to read as a property of width, since its own pruned copy (the same weights "
            f"pruned, plus {RECIPES['pruned']['epochs']} epochs) scored {sp['pseudo_fid']}: its "
            "baseline was likely far from converged "
            "or evaluated differently.")
    if "pruned" in rows:
        p = rows["pruned"]
        lines.append(
            f"- **Pruning that shrinks.** The study's pruned model kept "
            f"{_fmt_params(sp['params'])} parameters and {sp['size_mb']} MB (masks). Here the "
            f"pruned file is {p['bytes'] / b['bytes']:.0%} of the "
            f"baseline's ({p['size_mb']:.2f} vs {b['size_mb']:.2f} MiB), with "
            f"{p['params'] / b['params']:.0%} of the parameters, {p['macs'] / b['macs']:.0%} of "
            f"the MACs and {p['nonzero_params'] / b['params']:.0%} non-zero weights; its "
            f"10k-sample time is {p['latency_10k_s'] / b['latency_10k_s']:.0%} of baseline's "
            "(only structured pruning speeds up dense kernels; the zeros only save storage). "
            f"Pseudo-FID {p['pseudo_fid']:.3f} vs baseline {b['pseudo_fid']:.3f} "
            f"({p['pseudo_fid'] / b['pseudo_fid'] - 1:+.0%}), although the pruned model trained "
            "longer in total (the baseline's epochs plus its fine-tuning); the study saw "
            f"pruning + fine-tuning improve on its baseline ({sb['pseudo_fid']} -> "
            f"{sp['pseudo_fid']}).")
    if "shallow" in rows:
        s = rows["shallow"]
        slower = s["latency_10k_s"] > b["latency_10k_s"]
        lines.append(
            f"- **Why shallow is slower.** The study saw shallow slower "
            f"({ss['latency_10k_s']} s vs {sb['latency_10k_s']} s) "
            f"despite fewer parameters. {'Here too' if slower else 'Not here'}: "
            f"{s['latency_10k_s']} s vs {b['latency_10k_s']} s. Parameters do not set the "
            "cost, MACs do: shallow runs "
            f"64 channels at full 28x28 resolution and 128 at 14x14, {s['macs'] / 1e6:.0f}M "
            f"MACs per image vs baseline's {b['macs'] / 1e6:.0f}M "
            f"({s['macs'] / b['macs']:.1f}x).")
    q = rows.get(f"{best}-int8")
    if q:
        base = rows[best]
        lines.append(
            f"- **int8.** The best model ({best}) stored as per-channel int8 takes "
            f"{q['size_mb']:.2f} MiB ({q['bytes'] / base['bytes']:.0%} of its float file), "
            f"pseudo-FID {q['pseudo_fid']:.3f} vs {base['pseudo_fid']:.3f}. It runs in float "
            "(weights dequantized at load): int8 execution measured slower than bf16 here "
            "(benchmarks/results/int8_execution.md). The study did not quantize.")
        same = [rows[k]["latency_10k_s"] for k in (best, f"{best}-int8", f"{best}-fp16")
                if k in rows]
        drift = max(same) / min(same) - 1
        lines.append(
            f"- **Timing noise.** {best}, {best}-int8 and {best}-fp16 run the same float "
            f"network, yet took {', '.join(f'{t} s' for t in same)} for 10,000 samples: the "
            f"speed of this shared machine drifted by up to {drift:.0%} during the run, so "
            "latency differences of that size are not findings. MACs are the stable measure of "
            "cost; compare times only as large ratios (shallow vs baseline) or re-time models "
            "side by side (`minidiff bench`).")
    return lines


def readme_table(rows: list[dict]) -> str:
    """The README's results table, generated from ``results.json`` (a test checks that the
    README holds exactly this text). The study's column appears for MNIST only."""
    m = rows[0]
    mnist = m["dataset"] == "mnist"
    lines = [
        f"<!-- study-table: {m['preset']} preset, {m['dataset']}, {m['cpu']}, {m['date']} -->",
        "| model | params | size (MiB) | stored as | pseudo-FID | SSIM | precision / recall | "
        "10k samples |" + (" study: params / MB / FID / s |" if mnist else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if mnist else ""),
    ]
    for r in rows:
        st = STUDY.get(r["model"])
        study = (f"{_fmt_params(st['params'])} / {st['size_mb']} / {st['pseudo_fid']} / "
                 f"{st['latency_10k_s']}" if st else "—")
        lines.append(f"| {r['model']} | {r['params']:,} | {r['size_mb']:.2f} | {r['storage']} | "
                     f"{r['pseudo_fid']:.3f} | {r['ssim']:.3f} | {r['precision']:.2f} / "
                     f"{r['recall']:.2f} | {r['latency_10k_s']} s |"
                     + (f" {study} |" if mnist else ""))
    f = m["floor"]
    lines.append(f"| *real data (floor)* | | | | {f['pseudo_fid']:.3f} | {f['ssim']:.3f} | "
                 f"{f['precision']:.2f} / {f['recall']:.2f} | |" + (" |" if mnist else ""))
    return "\n".join(lines)


def write_report(out: str | Path, rows: list[dict], curves: list[dict] | None = None) -> Path:
    out = Path(out)
    meta = rows[0]
    figures = _plots(out, rows, meta["dataset"])
    curve_lines = []
    if curves:
        figures.insert(0, _curve_plot(out, curves))
        atomic_write_text(out / "curves.json", json.dumps(curves, indent=2) + "\n")
        devices = {}
        for p in curves:
            devices.setdefault(p["model"], set()).add(p["device"])
        curve_lines = [
            "## Quality against training compute",
            "",
            "Each model's EMA weights were evaluated during training (`--eval-every`, "
            "log-spaced); compute and seconds add up along a model's stages (pruned: the "
            "baseline's training, then its fine-tuning). Points are in `curves.json`. Devices "
            "of the training stages (last sitting; a stage resumed elsewhere adds both "
            "devices' seconds): "
            + "; ".join(f"{m} {', '.join(sorted(str(d) for d in ds))}"
                        for m, ds in devices.items()) + ".",
            "",
            *_curve_findings(curves),
            "",
        ]
    for r in rows:
        src = out / "stages" / r["eval_stage"] / "grid.png"
        if src.is_file():
            shutil.copyfile(src, out / FIGURES / f"grid-{r['model']}.png")
    floor = meta["floor"]
    mnist = meta["dataset"] == "mnist"  # the study's numbers are MNIST's: compared there only
    study_head = " Study: Params / MB / FID / SSIM / s |" if mnist else ""
    lines = [
        f"# Compression study: `{meta['preset']}` preset on {meta['dataset']}",
        "",
        f"Re-create: `minidiff study --preset {meta['preset']} --dataset {meta['dataset']} "
        f"--out DIR`. Hardware: {meta['cpu']}, {meta['threads']} threads, torch "
        f"{meta['torch']}; {meta['date']}. Every model is sampled with {meta['sampler']}, "
        f"{meta['steps']} steps ({meta['spacing']}), seed {meta['seed']}, n = {meta['n']:,}, "
        f"{meta['compute_dtype']}; the 10k time is {meta['latency_is']} (after one warm-up batch).",
        "",
        "| Model | Params | Size (MiB) | Stored as | MACs | Pseudo-FID | KID | Precision | "
        "Recall | SSIM | Memorised | 10k samples (s) |" + study_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mnist else ""),
    ]
    for r in rows:
        st = STUDY.get(r["model"])
        study = (f"{_fmt_params(st['params'])} / {st['size_mb']} / {st['pseudo_fid']} / "
                 f"{st['ssim']} / {st['latency_10k_s']}" if st else "—")
        lines.append(
            f"| {r['model']} | {_fmt_params(r['params'])} | {r['size_mb']:.2f} | {r['storage']} | "
            f"{r['macs'] / 1e6:.1f}M | {r['pseudo_fid']:.3f} | {r['kid']:.4f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['ssim']:.4f} | "
            f"{r['memorization']:.3f} | {r['latency_10k_s']} |" + (f" {study} |" if mnist else ""))
    lines.append(
        f"| *real data (floor)* | | | | | {floor['pseudo_fid']:.3f} | {floor['kid']:.4f} | "
        f"{floor['precision']:.3f} | {floor['recall']:.3f} | {floor['ssim']:.4f} | "
        f"{floor['memorization']:.3f} | |" + (" |" if mnist else ""))
    lines += [
        "",
        "Size is the safetensors file in MiB (2^20 bytes; the study's 2.53M fp32 parameters "
        "= 9.65 MiB). The floor is the same metrics for n real training images against the "
        "test set: no model can be expected to beat it. "
        + ("The study's column is copied from its README (its numbers came from a notebook "
           "with 1,000 DDPM steps, likely on a GPU)." if mnist else
           "The study ran on MNIST only, so its numbers are not set beside these; the "
           "findings below compare with its MNIST conclusions."),
        "",
        *curve_lines,
        "## Findings against the study's",
        "",
        *_discussion({r["model"]: r for r in rows}, meta["best"]),
        "",
        "## Figures",
        "",
        *[f"![{name}]({FIGURES}/{name})" for name in figures],
        "",
        "## Samples (first 64 of each model's n)",
        "",
    ]
    for r in rows:
        lines += [f"**{r['model']}**", "", f"![{r['model']}]({FIGURES}/grid-{r['model']}.png)",
                  ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    return path


def preset_rows() -> list[dict]:
    """Each preset's channels, parameters (and the study's count) and MACs per image."""
    nets = {name: UNet(cfg) for name, cfg in PRESETS.items()}
    return [{"preset": name, "channels": list(net.config.channels), "params": count_params(net),
             "study_params": STUDY[name]["params"], "macs_per_image": count_macs(net)}
            for name, net in nets.items()]


def preset_table(rows: list[dict]) -> str:
    """:func:`preset_rows` as the table `minidiff models` prints."""
    lines = [f"{'preset':<10} {'channels':<15} {'params':>10} {'study':>10} {'MACs/image':>12}"]
    lines += [f"{r['preset']:<10} {str(tuple(r['channels'])):<15} {r['params']:>10,} "
              f"{r['study_params']:>10,} {r['macs_per_image'] / 1e6:>10.1f} M" for r in rows]
    return "\n".join(lines)
