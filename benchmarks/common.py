"""What the benchmark scripts share: where results go, a results file to continue, the
labels a conditional model is scored with, and a row's draws summarised over seeds.

Each script runs as a file (``.venv/bin/python benchmarks/NAME.py``), which puts this folder on
``sys.path``; ``import common`` also puts the checkout's ``src`` there, so the scripts measure
the checkout's minidiff, not an installed one.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minidiff.allocator import keep_freed_memory  # noqa: E402
from minidiff.generation import class_labels  # noqa: E402
from minidiff.runtime import environment  # noqa: E402

keep_freed_memory()  # as the command line does, so times match it
RESULTS = Path(__file__).resolve().parent / "results"
# the guidance rule's conditional-accuracy target (guidance_sweep.py, guidance_seeds.py)
GUIDANCE_TARGET = 0.98
RESULTS.mkdir(exist_ok=True)


def as_drawn(model, n: int):
    """The labels a model is scored with, as its user draws it: ``n / num_classes`` of each
    class for a class-conditional model (guided by the default scale), None otherwise."""
    classes = model.config.num_classes
    return class_labels("all", n, classes, "") if classes else None


def resume_results(path: Path, checkpoint, digest: str, n: int, precision: str, **record) -> dict:
    """The results in ``path`` when they were measured on the same checkpoint (``digest``),
    ``n`` and ``precision``, so that a stopped run continues with its rows; else a fresh record
    of these, ``record`` and the environment, with no rows."""
    res = json.loads(path.read_text()) if path.is_file() else {}
    if (res.get("checkpoint_sha256"), res.get("n"), res.get("precision")) != (digest, n,
                                                                              precision):
        res = {"checkpoint": str(checkpoint), "checkpoint_sha256": digest, "n": n,
               "precision": precision, **record, **environment(), "rows": []}
    return res


def over_seeds(rows: list[dict], label: str, seeds: list[int], keys) -> dict | None:
    """The draws of row ``label`` at ``seeds`` summarised: the mean of each of ``keys`` they
    record, pseudo-FID's min..max (``fid_range``), the median ``seconds``, and the first draw's
    sampler, steps, spacing, checkpoint and guidance; None until every seed is measured."""
    mine = [r for r in rows if r["label"] == label and r["seed"] in seeds]
    if len(mine) < len(seeds):
        return None
    out = {k: statistics.mean(r[k] for r in mine) for k in keys if k in mine[0]}
    out["fid_range"] = (min(r["pseudo_fid"] for r in mine), max(r["pseudo_fid"] for r in mine))
    out["seconds"] = statistics.median(r["seconds"] for r in mine)
    out.update({k: mine[0][k] for k in ("sampler", "steps", "spacing", "checkpoint", "guided")
                if k in mine[0]})
    return out
