"""MSDNet: Multi-Scale Dense Networks (Huang et al., ICLR 2018) as anytime networks.

The network keeps a feature map at each of S scales (finest first). Every layer adds `growth`
channels (times the scale's growth factor) to every surviving scale, DenseNet style: at scale s the
new features are a strided conv of scale s-1 next to a conv of scale s, concatenated with the
identity. Under prune "max" the finest scale is dropped at regular intervals, and a 1x1 transition
halves the channels there. An exit after each block reads the coarsest scale only.

    import pipeline.models, timm
    model = timm.create_model("msdnet26", num_classes=1000)     # k = 4; msdnet36: 6, msdnet41: 7
    model = timm.create_model("msdnet_cifar", num_classes=100)  # 7 exits, 3 scales, 32x32

ImageNet variants (SPEC section 4): 4 scales, 5 blocks of k layers each (stepmode "even", base =
step = k), 32 initial channels, growth 16, growth and bottleneck factors 1-2-4-4, transition
reduction 0.5. Their heads keep the width of the coarsest scale, as the official ImageNet classifier
does; that is what SPEC's parameter counts imply (128-wide heads, `head_channels=128`, as in the
CIFAR classifier, would leave msdnet26 with 10.8M parameters, not 24.0M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from timm.layers import ConvNormAct
from timm.models import register_model
from torch import nn

from pipeline.models.anytime import refuse_pretrained


@dataclass(frozen=True)
class MSDNetConfig:
    blocks: int = 5  # = exits
    base: int = 4  # layers in the first block
    step: int = 4  # layers per later block ("even"), or the growth of that count ("lin_grow")
    stepmode: str = "even"
    channels: int = 32  # of the finest scale after the first layer
    growth: int = 16
    grow_factors: tuple[int, ...] = (1, 2, 4, 4)  # per scale; its length is the number of scales
    bn_factors: tuple[int, ...] = (1, 2, 4, 4)  # bottleneck width = factor x the conv's output
    reduction: float = 0.5  # channels kept by a transition
    bottleneck: bool = True
    imagenet_stem: bool = True  # 7x7/2 conv + 3x3/2 max-pool; else one 3x3 conv (CIFAR)
    head_channels: int | None = None  # None: the head keeps its input width

    @property
    def scales(self) -> int:
        return len(self.grow_factors)

    def block_lengths(self) -> list[int]:
        if self.blocks < 1 or self.base < 1 or self.step < 1:
            raise ValueError(f"blocks, base and step must be >= 1, got {self.blocks}, "
                             f"{self.base}, {self.step}")
        if self.stepmode == "even":
            return [self.base] + [self.step] * (self.blocks - 1)
        if self.stepmode == "lin_grow":
            return [self.base] + [self.step * i + 1 for i in range(1, self.blocks)]
        raise ValueError(f"stepmode must be 'even' or 'lin_grow', got {self.stepmode!r}")


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> ConvNormAct:
    return ConvNormAct(in_chs, out_chs, kernel_size, stride=stride)


class ConvBranch(nn.Sequential):
    """[1x1 bottleneck ->] 3x3 conv (stride 2 when it reads the next finer scale)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottleneck: bool, bn_factor: int):
        inner = min(in_chs, bn_factor * out_chs) if bottleneck else in_chs
        layers = [_conv(in_chs, inner, 1)] if bottleneck else []
        super().__init__(*layers, _conv(inner, out_chs, 3, stride))


class ScaleUnit(nn.Module):
    """New features at one scale: cat(x, conv(x)), or cat(x, down(finer), conv(x)) when a finer
    scale exists; each branch then gives half of the scale's growth."""

    def __init__(self, cfg: MSDNetConfig, in_width: int, scale: int, has_finer: bool):
        super().__init__()
        g, f = cfg.grow_factors, cfg.bn_factors
        growth = cfg.growth * g[scale]
        self.down = None
        if has_finer:
            self.down = ConvBranch(in_width * g[scale - 1], growth // 2, 2, cfg.bottleneck,
                                   f[scale - 1])
            growth //= 2
        self.same = ConvBranch(in_width * g[scale], growth, 1, cfg.bottleneck, f[scale])

    def forward(self, x: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([x, self.same(x)], 1)
        return torch.cat([x, self.down(finer), self.same(x)], 1)


class MSDLayer(nn.Module):
    """One MSDNet layer: `in_scales` coarsest scales in, `out_scales` out (one fewer when the finest
    is dropped: it is then only read, strided, by the next scale)."""

    def __init__(self, cfg: MSDNetConfig, in_width: int, in_scales: int, out_scales: int):
        super().__init__()
        self.dropped = in_scales - out_scales
        first = cfg.scales - out_scales  # absolute index of the finest output scale
        self.units = nn.ModuleList(
            ScaleUnit(cfg, in_width, s, has_finer=self.dropped > 0 or s > first)
            for s in range(first, cfg.scales))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, unit in enumerate(self.units):
            j = i + self.dropped  # this scale's position in `feats`
            out.append(unit(feats[j], feats[j - 1] if j > 0 else None))
        return out


class Transition(nn.ModuleList):
    """A 1x1 conv per surviving scale, cutting the channels to `reduction` of them."""

    def __init__(self, cfg: MSDNetConfig, in_width: int, out_width: int, out_scales: int):
        g = cfg.grow_factors
        super().__init__(_conv(in_width * g[s], out_width * g[s], 1)
                         for s in range(cfg.scales - out_scales, cfg.scales))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self, feats)]


class FirstLayer(nn.Module):
    """The image -> one feature map per scale, each from the previous (finer) one."""

    def __init__(self, cfg: MSDNetConfig, in_chans: int):
        super().__init__()
        widths = [cfg.channels * g for g in cfg.grow_factors]
        if cfg.imagenet_stem:  # the official code's 7x7 conv keeps its bias
            stem = nn.Sequential(ConvNormAct(in_chans, widths[0], 7, stride=2, bias=True),
                                 nn.MaxPool2d(3, stride=2, padding=1))
        else:
            stem = _conv(in_chans, widths[0], 3)
        self.convs = nn.ModuleList([stem])
        self.convs.extend(_conv(a, b, 3, 2) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
        return feats


class ExitHead(nn.Sequential):
    """Two 3x3/2 conv-BN-ReLU -> average pool -> linear, on the coarsest scale.

    The official code pools 2x2, which is global at 224 (ImageNet) and 32 (CIFAR); pooling
    globally keeps that and lets other input sizes work.
    """

    def __init__(self, in_chs: int, width: int, num_classes: int):
        super().__init__(_conv(in_chs, width, 3, 2), _conv(width, width, 3, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))


class MSDNet(nn.Module):
    """First layer -> blocks of MSD layers (with transitions) -> an exit after every block."""

    def __init__(self, cfg: MSDNetConfig, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        lengths = cfg.block_lengths()
        total, scales = sum(lengths), cfg.scales
        interval = math.ceil(total / scales)  # prune "max": drop the finest scale every interval
        self.first = FirstLayer(cfg, in_chans)
        self.blocks = nn.ModuleList()
        self.exits = nn.ModuleList()
        width, n = cfg.channels, 0  # scale s has width * grow_factors[s] channels
        for length in lengths:
            block = nn.Sequential()
            for _ in range(length):
                n += 1
                in_scales = scales - max(0, n - 2) // interval
                out_scales = scales - (n - 1) // interval
                block.append(MSDLayer(cfg, width, in_scales, out_scales))
                width += cfg.growth
                if in_scales > out_scales and cfg.reduction > 0:
                    reduced = math.floor(cfg.reduction * width)
                    block.append(Transition(cfg, width, reduced, out_scales))
                    width = reduced
            self.blocks.append(block)
            head_in = width * cfg.grow_factors[-1]
            self.exits.append(ExitHead(head_in, cfg.head_channels or head_in, num_classes))
        if out_scales > 1:  # the finer scales' last features would feed nothing (DDP errors)
            raise ValueError(f"{total} layers over {scales} scales leave {out_scales} scales at "
                             f"the end; only the coarsest reaches an exit. Use more layers.")
        self.num_exits = len(self.exits)
        self.exit_positions = [f"block{i + 1}" for i in range(self.num_exits)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        until = self.num_exits if until is None else until
        if not 1 <= until <= self.num_exits:
            raise ValueError(f"until={until} is not an exit of this model (1..{self.num_exits})")
        # Whole blocks run even before an early exit: the finer scales of a block's last layers
        # feed only later exits, but MSDNet's reference costs (SPEC) count whole blocks too.
        feats = self.first(x)
        logits = []
        for block, head in zip(self.blocks[:until], self.exits[:until]):
            feats = block(feats)
            logits.append(head(feats[-1]))
        return logits


def _create(name: str, cfg: MSDNetConfig, pretrained: bool = False, num_classes: int = 1000,
            in_chans: int = 3, **kwargs) -> MSDNet:
    refuse_pretrained(name, pretrained, kwargs)
    for key in ("grow_factors", "bn_factors"):  # YAML and the CLI give lists
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    unknown = set(kwargs) - {f.name for f in fields(MSDNetConfig)}
    if unknown:
        raise TypeError(f"unexpected arguments for {name}: {', '.join(sorted(unknown))}")
    cfg = replace(cfg, **kwargs)
    if len(cfg.bn_factors) != cfg.scales:
        raise ValueError(f"{name}: bn_factors {cfg.bn_factors} need one entry per scale "
                         f"(grow_factors {cfg.grow_factors})")
    return MSDNet(cfg, num_classes=num_classes, in_chans=in_chans)


_IMAGENET = MSDNetConfig()


@register_model
def msdnet26(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, base = step = 4 (20 MSD layers)."""
    return _create("msdnet26", replace(_IMAGENET, base=4, step=4), pretrained, **kwargs)


@register_model
def msdnet36(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, base = step = 6 (30 MSD layers)."""
    return _create("msdnet36", replace(_IMAGENET, base=6, step=6), pretrained, **kwargs)


@register_model
def msdnet41(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, base = step = 7 (35 MSD layers)."""
    return _create("msdnet41", replace(_IMAGENET, base=7, step=7), pretrained, **kwargs)


@register_model
def msdnet_cifar(pretrained: bool = False, **kwargs) -> MSDNet:
    """CIFAR MSDNet for 32x32 images: 3 scales, a 3x3 conv per scale as the first layer, heads of
    two 128-wide 3x3/2 convs. Defaults are the official repository's CIFAR anytime command:
    blocks=7, base=4, step=2 (stepmode "even"), channels=16, growth=6, factors 1-2-4. Any field of
    `MSDNetConfig` may be overridden, e.g. `blocks=10, stepmode="lin_grow", base=1, step=1`.
    """
    cfg = MSDNetConfig(blocks=7, base=4, step=2, channels=16, growth=6, grow_factors=(1, 2, 4),
                       bn_factors=(1, 2, 4), imagenet_stem=False, head_channels=128)
    kwargs.setdefault("num_classes", 10)
    return _create("msdnet_cifar", cfg, pretrained, **kwargs)
