"""Evaluation during training: the pseudo-FID of a model's samples, cheap enough to repeat;
and :func:`score`, one sampler setting's timed draw scored in full, as the benchmarks record it.

``minidiff train --eval-every`` and the convergence benchmark call an :class:`Evaluator` on the
EMA weights every so often; it draws ``n`` images with a fixed seed and sampler (default:
:data:`~minidiff.settings.EVAL_SAMPLING`) and scores them against the reference split, so
successive points of one run differ only by the weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .classifier import features_and_logits
from .diffusion import DiffusionConfig
from .generation import resolve_sampling, time_generation
from .metrics import Reference, evaluate_conditional, evaluate_images, frechet_distance
from .settings import EVAL_N, EVAL_SAMPLING, SamplingConfig


class Evaluator:
    """``evaluator(model) -> {"pseudo_fid", "confidence", "n", "seconds"}`` for an
    unconditional draw of ``n`` images from ``model`` (a conditional model is sampled with the
    "no label" class)."""

    def __init__(self, diffusion: DiffusionConfig, n: int = EVAL_N, dataset: str = "mnist",
                 sampling: SamplingConfig | None = None, device: torch.device | str = "cpu",
                 data_dir=None):
        self.n, self.device = n, torch.device(device)
        cfg = replace(sampling or EVAL_SAMPLING, guidance=None)
        self.sampling, self.sched = resolve_sampling(cfg, {"diffusion": diffusion.to_dict()},
                                                     self.device)
        self.ref = Reference(dataset, "test", data_dir)

    def __call__(self, model: torch.nn.Module) -> dict:
        was_training = model.training
        run = time_generation(model, self.sched, self.sampling, self.n, device=self.device)
        model.train(was_training)
        feats, logits = features_and_logits(self.ref.classifier, run.result)
        return {"pseudo_fid": frechet_distance(feats, self.ref.features),
                "confidence": logits.softmax(1).max(1).values.mean().item(),
                "n": self.n, "seconds": round(run.seconds, 2)}


SCORES = ("pseudo_fid", "kid", "precision", "recall", "confidence", "class_max_dev")


def score(model: torch.nn.Module, config: dict, cfg: SamplingConfig, n: int, ref: Reference,
          device: torch.device | str = "cpu", y: torch.Tensor | None = None) -> dict:
    """``{"seconds", "pseudo_fid", "kid", "precision", "recall", "confidence", ...}`` of ``n``
    images drawn from ``model`` (``config``: its checkpoint's) with ``cfg``, the draw timed and
    scored against ``ref``; rounded as the benchmarks' result files keep them. With labels
    ``y: [n]`` (a conditional model, guided by ``cfg.guidance``), also the share the classifier
    assigns to the requested class, ``conditional_accuracy``."""
    cfg, sched = resolve_sampling(cfg, config, torch.device(device))
    run = time_generation(model, sched, cfg, n, device=device, y=y)
    m = evaluate_images(run.result, ref)
    if y is not None:
        m.update(evaluate_conditional(run.result, y, ref))
    keys = SCORES + (("conditional_accuracy",) if y is not None else ())
    return {"seconds": round(run.seconds, 1), **{k: round(m[k], 4) for k in keys}}
