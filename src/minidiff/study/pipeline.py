"""The compression study in one resumable command (``minidiff study``).

Stages, each written to ``DIR/stages/<name>-<hash>/`` where the hash covers the stage's own
settings and the hashes of the stages it reads, so a re-run skips every finished stage and
redoes only what a changed setting invalidates:

    baseline   train the baseline (32/64/128)
    pruned     structured + unstructured pruning of the baseline, then fine-tuning
    reduced    train reduced (16/32/64), then fine-tune
    shallow    train shallow (64/128), then fine-tune
    eval:*     the same number of samples from each model with one sampler, steps and seed;
               every metric of the evaluation suite; the time for those samples
    best-int8, best-fp16   the best model (lowest pseudo-FID) stored as int8 / fp16, evaluated

then ``DIR/results.json`` (one row per model), ``DIR/curves.json`` (the evaluations during
training, chained along each model's stages), ``DIR/report.md`` and its figures. Reduced and
shallow train the baseline's epochs, or its FLOPs where the preset is at equal compute.
``run(only=...)`` trains some models' stages and stops (``pruned`` includes the baseline's), so
processes can train architectures side by side before one run evaluates them all.

Two processes never write one stage: a whole run holds the study folder's lock
(:func:`minidiff.files.run_lock`) from start to end, and every training stage holds its own
folder's lock while it trains, which is what lets ``--only`` runs share a study folder. A
folder that holds something other than this study is written into only with ``force``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..checkpoint import CHECKPOINTS, load_checkpoint, resolve
from ..compress import copy_checkpoint, prune_checkpoint, quantize_checkpoint, refuse_overwrite
from ..data import load_split
from ..errors import MinidiffError
from ..files import LOCK_FILE, atomic_write_text, run_lock, save_grid
from ..generation import resolve_sampling, time_generation
from ..metrics import evaluate
from ..runtime import environment, resolve_device
from ..samplefiles import save_samples, sidecar
from ..train import train
from ..unet import PRESETS as UNET
from ..unet import UNet, count_macs, count_params
from .presets import PRESETS, StudyConfig
from .recipes import diffusion_config, train_config
from .reference import RECIPES
from .report import write_report

ARCH = ("baseline", "pruned", "reduced", "shallow")


def preset_macs(arch: str) -> int:
    """MACs per image of the U-Net preset ``arch``."""
    return count_macs(UNet(UNET[arch]))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class Study:
    """Runs the stages of one :class:`StudyConfig` under ``out``; see the module docstring."""

    def __init__(self, cfg: StudyConfig, out: str | Path, *, data_dir=None, progress=True,
                 log=print, force: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.data_dir, self.progress, self.log = data_dir, progress, log
        self.force = force  # write into an --out that holds something else
        self.stages = self.out / "stages"

    # ------------------------------------------------------------------ stage bookkeeping
    def _folder(self, name: str, settings: dict) -> Path:
        return self.stages / f"{name}-{_hash(settings)}"

    def _done(self, folder: Path) -> dict | None:
        f = folder / "stage.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _finish(self, folder: Path, record: dict) -> dict:
        atomic_write_text(folder / "stage.json", json.dumps(record, indent=2) + "\n")
        return record

    # ------------------------------------------------------------------ stages
    @functools.cached_property
    def train_images(self) -> int:
        """Images per epoch (the subset, or the dataset's training split)."""
        return self.cfg.subset or len(load_split(self.cfg.dataset, "train", self.data_dir)[0])

    def eval_every(self, epochs: float, points: int) -> tuple[int, ...] | None:
        """``points`` log-spaced steps of a stage of ``epochs`` (halving back from its end)."""
        if points <= 0:
            return None
        bs = train_config(None, self.cfg.original_recipe, batch_size=self.cfg.batch_size)
        n = self.train_images
        total = math.ceil(epochs * max(1, n // min(bs.batch_size, n)))
        return tuple(sorted({max(1, round(total / 2**k)) for k in range(points)}))

    def stage(self, name: str, preset: str, *, init: Path | None = None, epochs: float,
              lr: float | None, depends: str = ""):
        """A training stage's folder and configs: ``(folder, train_config, diffusion_config,
        settings)``; the folder's name hashes ``settings``."""
        c = self.cfg
        points = min(3, c.eval_points) if init else c.eval_points
        tcfg = train_config(None, c.original_recipe, dataset=c.dataset, epochs=epochs,
                            batch_size=c.batch_size, lr=lr, seed=c.seed, subset=c.subset,
                            checkpoint_every=c.checkpoint_every, init=str(init) if init else None,
                            eval_every=self.eval_every(epochs, points),
                            eval_n=c.eval_n if points else None)
        diffusion = diffusion_config(c.original_recipe)
        settings = {"stage": name, "preset": preset, "train": tcfg.to_dict(),
                    "diffusion": diffusion.to_dict(), "after": depends}
        settings["train"]["init"] = None  # the path is covered by `depends`
        return self._folder(name, settings), tcfg, diffusion, settings

    def train(self, name: str, preset: str, *, init: Path | None = None, epochs: float,
              lr: float | None, depends: str = "") -> Path:
        """Train (or fine-tune from ``init``) into a stage folder; resumes a stopped stage."""
        folder, tcfg, diffusion, settings = self.stage(name, preset, init=init, epochs=epochs,
                                                       lr=lr, depends=depends)
        if self._done(folder):
            self.log(f"study: {name}: done ({folder.name})")
            return folder
        with run_lock(folder):  # another --only run may be training this stage
            if self._done(folder):  # it finished while this one waited to look
                return folder
            # resume from the newest checkpoint; a stage stopped before its first one starts over
            resume = any((folder / CHECKPOINTS).glob("step-*"))
            if not resume:
                _clear(folder)
            self.log(f"study: {name}: {'resuming' if resume else 'training'} {epochs:g} epochs "
                     f"at lr {tcfg.lr:g} -> {folder}")
            t0 = time.perf_counter()
            summary = train(UNET[preset], diffusion, tcfg, folder, data_dir=self.data_dir,
                            resume=resume, progress=self.progress, preset=preset)
            self._finish(folder, {"stage": name, "settings": settings,
                                  "seconds": round(time.perf_counter() - t0, 1), **summary})
        return folder

    def prune(self, source: Path) -> Path:
        c = self.cfg
        settings = {"stage": "prune", "structured": c.structured,
                    "unstructured": c.unstructured, "after": source.name}
        folder = self._folder("prune", settings)
        if self._done(folder):
            return folder
        # force: a model there without stage.json is this stage's own, stopped before its record
        record = prune_checkpoint(source, folder, structured=c.structured,
                                  unstructured=c.unstructured, force=True)
        self.log(f"study: pruned {record['before']['params']:,} -> "
                 f"{record['after']['params']:,} params, sparsity {record.get('sparsity')}")
        self._finish(folder, {"stage": "prune", "settings": settings, **record})
        return folder

    def quantize(self, source: Path, mode: str) -> Path:
        settings = {"stage": f"quantize-{mode}", "after": source.name}
        folder = self._folder(f"quantize-{mode}", settings)
        if self._done(folder):
            return folder
        record = quantize_checkpoint(source, folder, mode=mode, force=True)  # as prune's
        self._finish(folder, {"stage": f"quantize-{mode}", "settings": settings, **record})
        return folder

    def evaluate(self, model_name: str, checkpoint: Path) -> dict:
        """Sample ``n`` images (timed, after a warm-up batch) and evaluate them -> one row."""
        c, s = self.cfg, self.cfg.sampling
        settings = {"stage": "eval", "model": model_name, "n": c.n, "sampler": s.sampler,
                    "steps": s.steps, "spacing": s.spacing, "seed": s.seed,
                    "after": checkpoint.name}
        folder = self._folder(f"eval-{model_name}", settings)
        done = self._done(folder)
        if done:
            return done["row"]
        dev = resolve_device("auto")
        model, config, digest = load_checkpoint(checkpoint, dev)
        s, sched = resolve_sampling(replace(s, guidance=None), config, dev)
        self.log(f"study: sampling {c.n} from {model_name} ({s.sampler}, {s.steps} steps)")
        run = time_generation(model, sched, s, c.n, device=dev, warmup=s.batch_size)
        images, seconds = run.result, run.seconds
        folder.mkdir(parents=True, exist_ok=True)
        save_samples(folder / "samples.npz", images.numpy(),
                     sidecar(s, c.n, checkpoint, digest, seconds, c.dataset))
        save_grid(images[:64].numpy(), folder / "grid.png", nrow=8)
        metrics = evaluate(images, c.dataset, data_dir=self.data_dir, seed=c.seed)
        weights, _ = resolve(checkpoint)
        storage = config.get("storage") or {}
        row = {
            "model": model_name,
            "params": count_params(model),
            "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters()),
            "bytes": weights.stat().st_size,
            "size_mb": round(weights.stat().st_size / 2**20, 3),
            "storage": ("int8" if storage.get("int8") else "fp16" if storage.get("half")
                        else "fp32") + ("+sparse" if storage.get("sparse") else ""),
            "macs": count_macs(model.cpu()),
            **{k: metrics[k] for k in ("pseudo_fid", "kid", "precision", "recall", "ssim",
                                       "ssim_nearest", "memorization", "confidence",
                                       "class_histogram", "class_max_dev")},
            "latency_10k_s": round(seconds * 10_000 / c.n, 1),
            "latency_is": "measured" if c.n == 10_000 else f"extrapolated from {c.n}",
            "sampler": s.sampler, "steps": s.steps, "spacing": s.spacing, "n": c.n,
            "compute_dtype": s.precision, "checkpoint_sha256": digest,
            "floor": {k: metrics["floor"][k] for k in ("pseudo_fid", "kid", "precision",
                                                        "recall", "ssim", "memorization")},
        }
        row["eval_stage"] = folder.name
        self._finish(folder, {"stage": "eval", "settings": settings, "row": row})
        self.log(f"study: {model_name}: pseudo-FID {row['pseudo_fid']:.3f}, "
                 f"{row['latency_10k_s']} s per 10k")
        return row

    # ------------------------------------------------------------------ the whole study
    def run(self, only: tuple[str, ...] = ()) -> list[dict]:
        """Every stage, holding the study folder's lock; with ``only`` (names from
        :data:`ARCH`), just the training stages of those models (e.g. one process per
        architecture on a GPU, each stage under its own lock), then stop."""
        self._claim()  # before the lock, which would leave its file in a folder refused here
        if only:
            return self._run(only)
        with run_lock(self.out):
            return self._run(only)

    def _claim(self) -> None:
        """Refuse, unless ``force``, an ``out`` that holds files but no study, or a study whose
        study.json disagrees with this one's config (its results would be replaced)."""
        record = self.out / "study.json"
        if self.force or not self.out.is_dir():
            return
        if not record.is_file():
            if any(p.name != LOCK_FILE for p in self.out.iterdir()):
                raise MinidiffError(f"{self.out} already exists and holds no study; pass --force "
                                    "to write the study into it or choose another --out")
            return
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None
        ours = json.loads(json.dumps(asdict(self.cfg)))  # as study.json stores it
        differ = sorted(k for k in ours if k in saved and _disagree(saved[k], ours[k])) \
            if isinstance(saved, dict) else ["study.json is unreadable"]
        if differ:
            raise MinidiffError(f"{self.out} holds another study ({', '.join(differ[:3])}); "
                                "re-run its own command to resume it, pass --force to replace "
                                "its results, or choose another --out")

    def _run(self, only: tuple[str, ...]) -> list[dict]:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "study.json", json.dumps(asdict(c), indent=2) + "\n")
        want = set(only or ARCH)
        models: dict[str, Path] = {}
        chains: dict[str, list[tuple[Path, bool]]] = {}  # stages behind each model, own or not
        if want & {"baseline", "pruned"}:
            models["baseline"] = self.train("baseline", "baseline", epochs=c.base_epochs,
                                            lr=c.lr)
        if "pruned" in want:
            pruned0 = self.prune(models["baseline"])
            ft = RECIPES["pruned"]
            models["pruned"] = self.train("pruned-ft", "baseline", init=pruned0,
                                          depends=pruned0.name, lr=ft["lr"],
                                          epochs=c.finetune_epochs(ft["epochs"], preset_macs))
            chains["pruned"] = [(models["baseline"], False), (models["pruned"], True)]
        if "baseline" in models:
            chains["baseline"] = [(models["baseline"], True)]
        for arch in ("reduced", "shallow"):
            if arch not in want:
                continue
            ft = RECIPES[arch]
            scratch = self.train(arch, arch, epochs=c.epochs_of(arch, preset_macs), lr=c.lr)
            models[arch] = self.train(f"{arch}-ft", arch, init=scratch / "model.safetensors",
                                      depends=scratch.name, lr=ft["lr"],
                                      epochs=c.finetune_epochs(ft["epochs"], preset_macs, arch))
            chains[arch] = [(scratch, True), (models[arch], True)]
        if only:
            self.log(f"study: trained {', '.join(sorted(want))}; run without --only to "
                     "evaluate and report")
            return []
        rows = [self.evaluate(name, models[name]) for name in ARCH]
        best = min(rows, key=lambda r: r["pseudo_fid"])["model"]
        for mode in ("int8", "fp16"):
            folder = self.quantize(models[best], mode)
            models[f"{best}-{mode}"] = folder
            rows.append(self.evaluate(f"{best}-{mode}", folder))
        env = {"preset": c.preset, "dataset": c.dataset, "seed": c.seed, "best": best,
               "equal_compute": c.equal_compute, **environment()}
        rows = [{**r, "checkpoint": str(models[r["model"]].relative_to(self.out)), **env}
                for r in rows]
        # results.json (one row per model), curves.json and report.md
        write_report(self.out, rows, curves({m: chains[m] for m in ARCH}, self.train_images))
        return rows


def curves(chains: dict[str, list[tuple[Path, bool]]], train_images: int) -> list[dict]:
    """The evaluation-during-training points of each model's stages, in order, with images
    seen (and epochs of ``train_images``), training FLOPs and seconds added up along the chain
    (pruned: the baseline's training, then its fine-tuning). A stage the model shares with
    another (the baseline, for pruned) gives only its last point, where the model's own curve
    starts."""
    points = []
    for model, stages in chains.items():
        acc = {"images_seen": 0, "train_flops": 0, "train_s": 0.0}
        for folder, own in stages:
            log = folder / "metrics.jsonl"
            recs = [r for r in map(json.loads, log.read_text().splitlines() if log.is_file()
                                   else []) if "eval" in r]
            record = json.loads((folder / "stage.json").read_text())
            stage = record["stage"]
            for k, r in enumerate(recs):
                if own or k == len(recs) - 1:
                    points.append({"model": model, "stage": stage, "step": r["step"],
                                   **{key: acc[key] + r[key] for key in acc},
                                   "epochs": round((acc["images_seen"] + r["images_seen"])
                                                   / train_images, 4),
                                   "pseudo_fid": r["eval"]["pseudo_fid"],
                                   "confidence": r["eval"]["confidence"], "n": r["eval"]["n"],
                                   "device": record.get("device")})
            if recs:
                acc = {key: acc[key] + recs[-1][key] for key in acc}
    return points


def export(study_dir: str | Path, dest: str | Path, *, force: bool = False,
           fp16_tolerance: float = 0.02) -> list[str]:
    """Copy a finished study's models into ``dest`` (``src/minidiff/assets/models/`` ships them)
    under their row names: ``baseline``, ``pruned``, ``reduced``, ``shallow`` in fp16 storage
    when the study's own fp16 row stayed within ``fp16_tolerance`` (relative pseudo-FID) of its
    float row, else as trained; and the int8 model as evaluated. Returns the names written.

    Models already in ``dest`` are replaced only with ``force``, each once its new copy is
    written beside it and loads (:func:`minidiff.compress.replace_folder`)."""

    study_dir, dest = Path(study_dir), Path(dest)
    try:
        rows = {r["model"]: r for r in json.loads((study_dir / "results.json").read_text())}
    except (OSError, ValueError) as e:
        raise MinidiffError(f"{study_dir}: no readable results.json ({e}); finish the study "
                            "first (re-run the same `minidiff study` command)") from None
    best = next(iter(rows.values()))["best"]
    fp16_ok = abs(rows[f"{best}-fp16"]["pseudo_fid"] / rows[best]["pseudo_fid"] - 1) \
        <= fp16_tolerance
    names = (*ARCH, f"{best}-int8")
    refuse_export(dest, names, force=force)
    for name in names:
        src = study_dir / rows[name]["checkpoint"]
        if fp16_ok and name in ARCH:
            quantize_checkpoint(src, dest / name, mode="fp16", force=True)
        else:
            copy_checkpoint(src, dest / name, force=True)
    return list(names)


def refuse_export(dest: str | Path, names, *, force: bool = False) -> None:
    """Refuse, unless ``force``, to export over anything already under one of ``names``."""
    for name in names:
        refuse_overwrite(Path(dest) / name, force, flag="--export DIR")


def summary_lines(rows: list[dict], out: Path) -> str:
    """One line per model of a finished study, then where its results went."""
    lines = [f"{r['model']:>14}  params {r['params']:>9,}  {r['size_mb']:6.2f} MiB  "
             f"pseudo-FID {r['pseudo_fid']:7.3f}  10k {r['latency_10k_s']:7.1f} s" for r in rows]
    return "\n".join([*lines, f"wrote {out / 'results.json'} and {out / 'report.md'}"])


def run_study(preset: str, out, *, dataset: str = "mnist", data_dir=None, progress=True,
              log=print, only: tuple[str, ...] = (), force: bool = False,
              **overrides) -> list[dict]:
    if preset not in PRESETS:
        raise MinidiffError(f"unknown study preset {preset!r}; choose one of: "
                            f"{', '.join(PRESETS)}")
    bad = [a for a in only if a not in ARCH]
    if bad:
        raise MinidiffError(f"--only {','.join(bad)}: choose from {', '.join(ARCH)}")
    cfg = replace(PRESETS[preset], dataset=dataset, **overrides)
    return Study(cfg, out, data_dir=data_dir, progress=progress, log=log,
                 force=force).run(only)


def _disagree(saved, ours) -> bool:
    """Whether two settings differ in a field both know (a study.json written before a field
    existed still resumes)."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        return any(_disagree(saved[k], ours[k]) for k in saved.keys() & ours.keys())
    return saved != ours


def _clear(folder: Path) -> None:
    """Empty a stage folder whose lock this process holds, keeping the lock file."""
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
