"""Does another rho, or another top noise level, make Karras spacing better at 10 steps?

Run: .venv/bin/python benchmarks/karras_rho.py [--seeds 0 1 2] [--n 1000] RHO:LOG_SIGMA_MAX ...
  e.g. 7:2.55 (today's `--spacing karras`) 5:2.55 10:2.55 7:2.0 7:3.0   -> printed

Samples the shipped `reduced` with 10 steps of the default SDE solver on Karras spacing with the
given rho and top noise level (log sigma; today's clip is 2.55, log-SNR -5.1), everything else as
`--spacing karras` does (``Schedule._log_sigma_spaced``, replaced here for the run), and prints
the pseudo-FID per seed and the mean. Every setting draws the same seeds, so settings compare on
common noise; the batch is the precision's default (256 in bf16).
"""

import argparse
import statistics

import common  # noqa: F401  (puts the checkout's src on sys.path)

import minidiff.diffusion as diffusion
from minidiff.checkpoint import load_checkpoint
from minidiff.evaluation import score
from minidiff.metrics import Reference
from minidiff.settings import SamplingConfig

SPACED = diffusion.Schedule._log_sigma_spaced  # today's, before any setting replaces it


def spacing(rho: float, top: float):
    """``Schedule._log_sigma_spaced`` with this rho and top noise level, whatever it is asked."""
    return lambda self, steps, _rho: SPACED(self, steps, rho, top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="RHO:LOG_SIGMA_MAX")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    model, config, _ = load_checkpoint("reduced")
    ref = Reference("mnist", "test")
    for setting in args.settings:
        rho, top = (float(v) for v in setting.split(":"))
        diffusion.Schedule._log_sigma_spaced = spacing(rho, top)
        fids = [score(model, config, SamplingConfig(steps=10, spacing="karras", seed=s), args.n,
                      ref)["pseudo_fid"] for s in args.seeds]
        print(f"rho {rho:g}, log sigma max {top:g}: {fids} mean {statistics.mean(fids):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
