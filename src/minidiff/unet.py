"""The study's simplified U-Net: a noise predictor that knows nothing about diffusion.

``UNet(x, t, y=None) -> eps`` maps a batch of images ``x: [N x C x H x W]`` and integer (or
real) timesteps ``t: [N]`` to a tensor of the same shape as ``x``. The schedule lives in
:mod:`minidiff.diffusion`; this module only sees ``t`` through a sinusoidal embedding.

Layout for ``channels=(c0, c1, c2)`` on 28 x 28 inputs::

    ResBlock(c0) @28 -> down -> ResBlock(c1) @14 -> down -> ResBlock(c2) @7
    bottleneck: ResBlock(c2), [self-attention, with attention=True,] ResBlock(c2) @7
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
    # self-attention over the lowest resolution's positions between the two bottleneck blocks
    # (the middle block of Ho et al. 2020 and improved-diffusion)
    attention: bool = False
    # Per-layer output widths that differ from ``channels`` (a structurally pruned model):
    # module name of a conv -> its output channels, e.g. {"down_blocks.0.conv1": 24}. A width
    # that feeds a GroupNorm must stay a multiple of norm_groups (the model refuses otherwise).
    widths: dict[str, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.widths is not None:
            object.__setattr__(self, "widths", {str(k): int(v) for k, v in self.widths.items()})
            bad = {k: v for k, v in self.widths.items() if k not in width_names(self) or v <= 0}
            if bad:
                raise ValueError(f"widths {bad}: each must name a conv of this layout "
                                 f"({', '.join(width_names(self)[:3])}, ...) and be positive")
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

    def width(self, name: str, default: int) -> int:
        """Output channels of the conv ``name``: its pruned width, else the preset's."""
        return (self.widths or {}).get(name, default)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        if d["widths"] is None:
            del d["widths"]  # an unpruned config.json stays free of pruning keys
        if not d["attention"]:
            del d["attention"]  # nor does a config.json written before the field
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# The study's three architectures (`minidiff models` prints their parameters beside the study's).
PRESETS: dict[str, UNetConfig] = {
    "baseline": UNetConfig(channels=(32, 64, 128)),
    "reduced": UNetConfig(channels=(16, 32, 64)),
    "shallow": UNetConfig(channels=(64, 128)),
}


def width_names(cfg: UNetConfig) -> list[str]:
    """Names of the convs whose output widths a :class:`UNetConfig` may override, in order."""
    n = len(cfg.channels)
    names = []
    for i in range(n):
        names += [f"down_blocks.{i}.conv1", f"down_blocks.{i}.conv2"]
        if i < n - 1:
            names.append(f"downsamples.{i}")
    names += [f"mid.{j}.conv{k}" for j in range(2) for k in (1, 2)]
    for i in range(n):
        names += [f"up_blocks.{i}.conv1", f"up_blocks.{i}.conv2"]
        if i < n - 1:
            names.append(f"upsamples.{i}")
    return names


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
    """Two 3x3 convs with GroupNorm + SiLU, time embedding added in between, and a skip path.

    ``c_mid`` is the first conv's width, which pruning may shrink on its own. ``skip_conv`` (a
    1x1 conv, else the identity) and ``pre`` (GroupNorm + SiLU in front of the first conv) follow
    the nominal layout, not the pruned widths, so that a pruned block keeps the structure and the
    state_dict keys of the block it was cut from.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float = 0.0,
                 *, c_mid: int, skip_conv: bool, pre: bool):
        super().__init__()
        # The first block sees raw pixels: no norm/activation in front of its first conv.
        self.pre = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU()) if pre else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_mid)
        self.norm2 = nn.GroupNorm(groups, c_mid)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if skip_conv else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.pre(x))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the positions of ``x: [N x C x H x W]``, pre-normed
    and residual, its output projection zero-initialised so a new block starts as the
    identity."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N x HW x C]
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """Noise predictor ``eps = UNet(x, t, y)``; see the module docstring for the layout."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, g, e = cfg.channels, cfg.norm_groups, cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.tdim, e), nn.SiLU(), nn.Linear(e, e))
        # One extra row is the "null" class used for label dropout / unconditional sampling.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, e) if cfg.num_classes else None

        w = cfg.width  # a conv's output width: the preset's, or its pruned width

        def block(name: str, c_in: int, nominal_in: int, c: int) -> ResBlock:
            """The ResBlock ``name`` of nominal width ``c`` reading ``c_in`` channels."""
            out = w(f"{name}.conv2", c)
            if nominal_in == c and c_in != out:
                raise ValueError(f"widths: {name} has an identity skip, so its output width "
                                 f"({out}) must equal its input width ({c_in})")
            return ResBlock(c_in, out, e, g, cfg.dropout, c_mid=w(f"{name}.conv1", c),
                            skip_conv=nominal_in != c, pre=nominal_in >= g)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_widths = []
        prev = nominal = cfg.in_channels
        for i, c in enumerate(ch):
            self.down_blocks.append(block(f"down_blocks.{i}", prev, nominal, c))
            prev = nominal = self.down_blocks[-1].conv2.out_channels
            skip_widths.append(prev)
            nominal = c
            if i < len(ch) - 1:
                d = w(f"downsamples.{i}", c)
                self.downsamples.append(nn.Conv2d(prev, d, 3, stride=2, padding=1))
                prev = d

        self.mid = nn.ModuleList()
        for j in range(2):
            self.mid.append(block(f"mid.{j}", prev, ch[-1], ch[-1]))
            prev = self.mid[-1].conv2.out_channels
        self.mid_attn = Attention(prev, g) if cfg.attention else None

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for k, i in enumerate(reversed(range(len(ch)))):
            nominal_in = (ch[i + 1] if i + 1 < len(ch) else ch[-1]) + ch[i]
            self.up_blocks.append(block(f"up_blocks.{k}", prev + skip_widths[i], nominal_in,
                                        ch[i]))
            prev = self.up_blocks[-1].conv2.out_channels
            if i > 0:
                u = w(f"upsamples.{k}", ch[i])
                self.upsamples.append(nn.ConvTranspose2d(prev, u, 2, stride=2))
                prev = u

        self.out_norm = nn.GroupNorm(g, prev)
        self.out = nn.Conv2d(prev, cfg.in_channels, 1)  # never pruned: it emits eps

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """``x: [N x C x H x W]``, ``t: [N]``, ``y: [N]`` class ids or None
        -> ``[N x C x H x W]``."""
        h, skips, emb = self.encode(x, t, y)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.out(F.silu(self.out_norm(h)))

    def features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """The bottleneck's output for ``forward``'s inputs, ``[N x C' x H' x W']`` at the
        lowest resolution: what a head reads to judge ``x`` (DMD2's GAN classifier)."""
        return self.encode(x, t, y)[0]

    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """The encoder and bottleneck: ``(h, skips, emb)``, which the decoder reads."""
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

        h, skips = x, []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid[0](h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        return self.mid[1](h, emb), skips, emb


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, shape: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of one forward pass, counted by PyTorch's FLOP counter (FLOPs / 2).

    ``model(x, t)`` is any noise predictor; ``shape`` of ``x`` defaults to one image of a
    :class:`UNet`'s config (``[1 x C x H x W]``)."""
    from torch.utils.flop_counter import FlopCounterMode

    if shape is None:
        cfg = model.config
        shape = (1, cfg.in_channels, cfg.image_size, cfg.image_size)
    dev = next(model.parameters()).device
    x, t = torch.zeros(shape, device=dev), torch.zeros(shape[0], dtype=torch.long, device=dev)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() // 2
