"""Classifier-free guidance around a class-conditional noise predictor (Ho & Salimans 2022)."""

from __future__ import annotations

import torch


class Guided(torch.nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around a class-conditional noise predictor:
    ``eps = eps(x, t, null) + scale * (eps(x, t, y) - eps(x, t, null))``, both terms from one
    forward pass over the ``2N`` batch. ``scale`` 0 is unconditional, 1 plain conditional, > 1
    trades diversity for class fidelity. Works with every sampler (they only see a model)."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        """``x: [N x C x H x W]``, ``t: [N]``, ``y: [N]`` -> guided ``eps: [N x C x H x W]``."""
        if y is None:
            return self.model(x, t, None)
        null = torch.full_like(y, self.model.config.num_classes)
        eps_c, eps_u = self.model(torch.cat([x, x]), torch.cat([t, t]),
                                  torch.cat([y, null])).float().chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)
