"""Where a CPU forward pass of a preset goes, and two scheduling levers for it.

Run: .venv/bin/python benchmarks/cpu_levers.py [--preset reduced] [--batch 128] [--rounds 7]
  [--tag NAME]  -> benchmarks/results/cpu_levers[-NAME].{json,md}

In the precision `--precision auto` picks, under inference mode, with freed memory kept as the
command line keeps it:
- the network's GFLOP per image and each operator's share of a forward pass (torch.profiler);
- images/s of the whole batch on torch's intra-op threads against the batch as two slices run
  at once, one Python thread and one intra-op thread each (and against one thread alone), the
  three alternated for --rounds rounds, medians and ranges; whether the sliced output is
  identical to the whole batch's;
- each 2x2, stride-2 transposed convolution of the preset against the same map as a 1x1
  convolution to 4x the channels and a pixel shuffle (ms per batch, median of --rounds, and the
  largest difference).
Neither lever is in minidiff (docs/speed.md says why); this measures them where a machine may
differ.
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import torch
import torch.nn.functional as F
from common import RESULTS
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from minidiff.runtime import autocast_context, environment, environment_line, resolve_precision
from minidiff.unet import PRESETS, UNet

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="reduced", choices=sorted(PRESETS))
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--tag", default="")
args = ap.parse_args()

precision = resolve_precision("auto", torch.device("cpu"))
torch.manual_seed(0)
model = UNet(PRESETS[args.preset]).eval()
B = args.batch
x, t = torch.randn(B, 1, 28, 28), torch.full((B,), 500)
threads = torch.get_num_threads()


def ms(fn, reps: int = 10) -> float:
    """Milliseconds per call of ``fn``, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):
    # operators' shares
    with FlopCounterMode(display=False) as flops:
        model(x, t)
    model(x, t)
    with profile() as prof:
        for _ in range(5):
            model(x, t)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda r: -r[1])
    shares = [(k, round(v, 3)) for k, v in shares[:6]]

    # the whole batch on the intra-op threads, two slices at once, one thread
    pool = ThreadPoolExecutor(1)

    def half(lo: int, hi: int) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):
            return model(x[lo:hi], t[lo:hi])

    def sliced() -> torch.Tensor:
        rest = pool.submit(half, B // 2, B)
        return torch.cat([half(0, B // 2), rest.result()])

    rates = {"whole batch, intra-op threads": [], "two slices at once, one thread each": [],
             "one thread": []}
    for _ in range(args.rounds):
        for name, fn, n_threads in [("whole batch, intra-op threads", lambda: model(x, t),
                                     threads),
                                    ("two slices at once, one thread each", sliced, 1),
                                    ("one thread", lambda: model(x, t), 1)]:
            torch.set_num_threads(n_threads)
            rates[name].append(B / ms(fn, 5) * 1e3)
    torch.set_num_threads(1)
    same = torch.equal(model(x, t), sliced())
    torch.set_num_threads(threads)

    # transposed convolutions against 1x1 + pixel shuffle
    ups = []
    for i, up in enumerate(model.upsamples):
        if not isinstance(up, torch.nn.ConvTranspose2d):
            continue
        c_in, c_out = up.weight.shape[:2]
        hw = 28 // 2 ** (len(model.upsamples) - i)
        u = torch.randn(B, c_in, hw, hw)
        w1 = up.weight.permute(1, 2, 3, 0).reshape(-1, c_in, 1, 1).contiguous()
        b1 = up.bias.repeat_interleave(4)

        def as_shuffle(u=u, w1=w1, b1=b1):
            return F.pixel_shuffle(F.conv2d(u, w1, b1), 2)

        a, b = [], []
        for _ in range(args.rounds):
            a.append(ms(lambda u=u, up=up: up(u)))
            b.append(ms(as_shuffle))
        ups.append({"in": [c_in, hw, hw], "out_channels": c_out,
                    "transposed_ms": round(statistics.median(a), 2),
                    "shuffle_ms": round(statistics.median(b), 2),
                    "max_difference": (up(u) - as_shuffle()).abs().max().item()})

res = {"preset": args.preset, "batch": B, "precision": precision, "rounds": args.rounds,
       "date": str(date.today()), **environment(),
       "gflop_per_image": round(flops.get_total_flops() / B / 1e9, 4), "shares": shares,
       "images_per_s": {k: [round(v) for v in vs] for k, vs in rates.items()},
       "sliced_output_identical": same, "upsampling": ups}
stem = "cpu_levers" + (f"-{args.tag}" if args.tag else "")
(RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
lines = [f"# A forward pass of `{args.preset}` on the CPU, and two levers "
         f"({environment_line(res)}; {precision}, batch {B})", "",
         f"{res['gflop_per_image']} GFLOP per image. Self time by operator: "
         + ", ".join(f"{k} {v:.0%}" for k, v in shares) + ".", "",
         "| schedule | images/s, median (min..max) |", "|---|---|"]
lines += [f"| {k} | {statistics.median(v):.0f} ({min(v):.0f}..{max(v):.0f}) |"
          for k, v in rates.items()]
lines += ["", f"Sliced output identical to the whole batch's: {same}.", "",
          "| transposed convolution (in: channels, size) | ms per batch | as 1x1 + pixel shuffle "
          "| largest difference |", "|---|---|---|---|"]
lines += [f"| {u['in']} -> {u['out_channels']} | {u['transposed_ms']} | {u['shuffle_ms']} | "
          f"{u['max_difference']:.1e} |" for u in ups]
lines += ["", f"Command: `.venv/bin/python benchmarks/cpu_levers.py --preset {args.preset} "
          f"--batch {B} --rounds {args.rounds}" + (f" --tag {args.tag}`" if args.tag else "`")]
(RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
