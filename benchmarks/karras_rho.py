"""Which rho, or top noise level, makes Karras spacing best at a few steps?

Run: .venv/bin/python benchmarks/karras_rho.py [--seeds 0 1 2] [--n 1000] [--steps 10]
       [--checkpoint reduced] RHO:LOG_SIGMA_MAX ...
  e.g. 7:2.55 (Karras et al.'s rho) 2:2.55 3:2.55 7:2.0 7:3.0   -> printed
  (a setting `trailing` samples `--spacing trailing` at the same steps, for comparison)

Samples a checkpoint (default: the shipped `reduced`) with the default SDE solver on
`--spacing karras --rho RHO` and, where the top noise level (log sigma) is not the clip of
2.55 (log-SNR -5.1), that top instead (``Schedule._log_sigma_spaced``, replaced here for the
run), and prints the pseudo-FID per seed and the mean. Every setting draws the same seeds, so
settings compare on common noise; the batch is the precision's default (256 in bf16). A
class-conditional checkpoint is drawn as its users draw it: n / 10 of each class, guided with the
default scale.
"""

import argparse
import statistics
from dataclasses import replace

import common

import minidiff.diffusion as diffusion
from minidiff.checkpoint import load_checkpoint
from minidiff.evaluation import score
from minidiff.metrics import Reference
from minidiff.settings import SamplingConfig

SPACED = diffusion.Schedule._log_sigma_spaced  # the library's, before a setting replaces it


def with_top(top: float):
    """``Schedule._log_sigma_spaced`` with this top noise level."""
    return lambda self, steps, rho: SPACED(self, steps, rho, top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="RHO:LOG_SIGMA_MAX")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--checkpoint", default="reduced")
    args = ap.parse_args()
    model, config, _ = load_checkpoint(args.checkpoint)
    ref = Reference("mnist", "test")
    y = common.as_drawn(model, args.n)
    for setting in args.settings:
        if setting == "trailing":
            cfg, what = SamplingConfig(steps=args.steps, spacing="trailing"), "trailing"
        else:
            rho, top = (float(v) for v in setting.split(":"))
            diffusion.Schedule._log_sigma_spaced = with_top(top)
            cfg = SamplingConfig(steps=args.steps, spacing="karras", rho=rho)
            what = f"rho {rho:g}, log sigma max {top:g}"
        fids = [score(model, config, replace(cfg, seed=s), args.n, ref, y=y)["pseudo_fid"]
                for s in args.seeds]
        print(f"{args.checkpoint}, {args.steps} steps, {what}: {fids} mean "
              f"{statistics.mean(fids):.3f}", flush=True)


if __name__ == "__main__":
    main()
