"""The study's simplified U-Net: a noise predictor that knows nothing about diffusion.

``UNet(x, t, y=None) -> eps`` maps a batch of images ``x: [N x C x H x W]`` and integer (or
real) timesteps ``t: [N]`` to a tensor of the same shape as ``x``. The schedule lives in
:mod:`minidiff.diffusion`; this module only sees ``t`` through a sinusoidal embedding.

Layout for ``channels=(c0, c1, c2)`` on 28 x 28 inputs::

    ResBlock(c0) @28 -> down -> ResBlock(c1) @14 -> down -> ResBlock(c2) @7
    bottleneck: ResBlock(c2), ResBlock(c2) @7
    decoder: [concat skip -> ResBlock -> ConvTranspose 2x2 up] per level, then 1x1 conv -> eps

Every ResBlock receives the time embedding through a linear projection added after its first
convolution (Ho et al. 2020). The class embedding (when ``num_classes`` is set) is added to
the time embedding, so conditioning costs one table lookup.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet` (serialised as JSON beside its weights)."""

    channels: tuple[int, ...] = (32, 64, 128)
    in_channels: int = 1
    image_size: int = 28
    time_dim: int | None = None  # sinusoidal width; None -> channels[-1]
    time_mult: int = 4  # the time MLP widens the sinusoid by this factor
    norm_groups: int = 8
    num_classes: int | None = None  # class conditioning (index num_classes = "no label")
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive integers, got {self.channels}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of norm_groups "
                             f"({self.norm_groups})")
        down = 2 ** (len(self.channels) - 1)
        if self.image_size % down:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {down} "
                f"({len(self.channels)} levels); use fewer levels or another image size"
            )

    @property
    def emb_dim(self) -> int:
        return self.tdim * self.time_mult

    @property
    def tdim(self) -> int:
        return self.time_dim or self.channels[-1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# The study's three architectures. Parameter counts are in the README beside the study's.
PRESETS: dict[str, UNetConfig] = {
    "baseline": UNetConfig(channels=(32, 64, 128)),
    "reduced": UNetConfig(channels=(16, 32, 64)),
    "shallow": UNetConfig(channels=(64, 128)),
}
STUDY_PARAMS = {"baseline": 2_530_000, "reduced": 634_000, "shallow": 2_150_000}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t: [N]`` -> ``[N x dim]`` (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU, time embedding added in between, 1x1 skip if needed."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        # The first block sees raw pixels: no norm/activation in front of its first conv.
        self.pre = (
            nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU()) if c_in >= groups else nn.Identity()
        )
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.pre(x))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Noise predictor ``eps = UNet(x, t, y)``; see the module docstring for the layout."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, g, e = cfg.channels, cfg.norm_groups, cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.tdim, e), nn.SiLU(), nn.Linear(e, e))
        # One extra row is the "null" class used for label dropout / unconditional sampling.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, e) if cfg.num_classes else None

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = cfg.in_channels
        for i, c in enumerate(ch):
            self.down_blocks.append(ResBlock(prev, c, e, g, cfg.dropout))
            if i < len(ch) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c

        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1], e, g, cfg.dropout) for _ in range(2)])

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        prev = ch[-1]
        for i in reversed(range(len(ch))):
            self.up_blocks.append(ResBlock(prev + ch[i], ch[i], e, g, cfg.dropout))
            if i > 0:
                self.upsamples.append(nn.ConvTranspose2d(ch[i], ch[i], 2, stride=2))
            prev = ch[i]

        self.out_norm = nn.GroupNorm(g, ch[0])
        self.out = nn.Conv2d(ch[0], cfg.in_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """``x: [N x C x H x W]``, ``t: [N]``, ``y: [N]`` class ids or None -> ``[N x C x H x W]``."""
        cfg = self.config
        assert x.shape[1:] == (cfg.in_channels, cfg.image_size, cfg.image_size), (
            f"expected [N x {cfg.in_channels} x {cfg.image_size} x {cfg.image_size}], "
            f"got {list(x.shape)}"
        )
        emb = self.time_mlp(timestep_embedding(t, cfg.tdim))
        if self.class_emb is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)

        # encoder
        h, skips = x, []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        # bottleneck
        for block in self.mid:
            h = block(h, emb)
        # decoder
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.out(F.silu(self.out_norm(h)))


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: UNet) -> int:
    """Multiply-accumulates for one image, counted by PyTorch's FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() // 2
