"""How long `minidiff eval` takes on 10,000 images (the target: under a minute on 2 cores).

Run: .venv/bin/python benchmarks/eval_speed.py  -> benchmarks/results/eval_speed.{json,md}

The 10,000 "samples" are real training images (what they are does not change the cost). Two
timings: the first evaluation builds the reference cache (test features, test-to-train
nearest-neighbour threshold); later ones reuse it. The floor is excluded (it is cached once per n).
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)

os.environ["MINIDIFF_CACHE"] = tempfile.mkdtemp()  # start cold

from minidiff.data import load_split  # noqa: E402
from minidiff.metrics import Reference, evaluate_images  # noqa: E402
from minidiff.runtime import environment, environment_line  # noqa: E402

images = load_split("mnist", "train")[0][:10000]
t0 = time.perf_counter()
ref = Reference("mnist", "test")
cold_ref = time.perf_counter() - t0
warm = []
for _ in range(3):
    t0 = time.perf_counter()
    ref = Reference("mnist", "test")
    evaluate_images(images, ref)
    warm.append(time.perf_counter() - t0)
result = {
    **environment(), "n": len(images),
    "reference_cache_build_s": round(cold_ref, 2),
    "eval_10k_s_runs": [round(w, 2) for w in warm],
    "eval_10k_s_median": round(statistics.median(warm), 2),
}
out = Path(__file__).resolve().parent / "results"
out.mkdir(exist_ok=True)
(out / "eval_speed.json").write_text(json.dumps(result, indent=2) + "\n")
(out / "eval_speed.md").write_text(
    f"# Evaluation speed ({environment_line(result)})\n\n"
    f"| what | seconds |\n|---|---|\n"
    f"| build the reference cache once (10k test features + test-to-train NN threshold) | "
    f"{result['reference_cache_build_s']} |\n"
    f"| evaluate 10,000 images (all metrics, warm cache), median of 3 | "
    f"{result['eval_10k_s_median']} |\n\n"
    f"Command: `.venv/bin/python benchmarks/eval_speed.py`\n")
print(json.dumps(result, indent=2))
