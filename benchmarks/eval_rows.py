"""Pseudo-FID, precision and recall of one checkpoint at several sampler/step pairs, seed 0,
as a JSON line each (a distilled student's own "sampling" entry is set aside, so every pair is
exactly what it names; `minidiff sample` cannot ask a student for --steps 8, see
docs/distillation.md).

Run: .venv/bin/python benchmarks/eval_rows.py CHECKPOINT N SAMPLER:STEPS [SAMPLER:STEPS ...]
e.g. benchmarks/eval_rows.py reduced 2000 dpmpp-sde:8 ddim:64 ddim:2
"""

import json
import sys

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)
import torch

from minidiff.checkpoint import load_checkpoint  # noqa: E402
from minidiff.generation import resolve_sampling, time_generation  # noqa: E402
from minidiff.metrics import Reference, evaluate_images  # noqa: E402
from minidiff.runtime import cpu_class  # noqa: E402
from minidiff.settings import SamplingConfig  # noqa: E402

ckpt, n, pairs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ref = Reference("mnist", "test")
model, config, _ = load_checkpoint(ckpt)
config = {k: v for k, v in config.items() if k != "sampling"}
for pair in pairs:
    sampler, steps = pair.split(":")
    cfg, sched = resolve_sampling(SamplingConfig(sampler, int(steps), "trailing", seed=0,
                                                 guidance=None), config, torch.device("cpu"))
    run = time_generation(model, sched, cfg, n)
    m = evaluate_images(run.result, ref)
    print(json.dumps({"checkpoint": ckpt, "sampler": sampler, "steps": int(steps), "n": n,
                      "precision_mode": cfg.precision, "cpu": cpu_class(),
                      **{k: round(m[k], 4) for k in ("pseudo_fid", "precision", "recall")}}),
          flush=True)
