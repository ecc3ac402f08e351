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

Every name takes timm's `num_classes`, `in_chans`, `drop_rate`, `drop_path_rate`, `global_pool`,
`features_only`, `device` and `dtype` (of every parameter) and `output_exit` (the single-tensor
view, `AnytimeModel`), and `head_pool` ("global", default, or the official "avg2x2"); see `MSDNet`.
The timm methods act on every exit (`AnytimeModel`, docs/models.md): `forward_features(x,
exit_index=None)` is the coarsest scale after block `exit_index` (default the last), which that
exit's head reads; `forward_head` that exit's head; `get_classifier` / `reset_classifier` every
exit's linear layer; `set_grad_checkpointing` recomputes each MSD layer and transition in the
backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from timm.layers import ConvNormAct, DropPath, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from pipeline.models.anytime import (
    AnytimeModel,
    ExitClassifier,
    anytime_cfg,
    build_anytime,
    cifar_cfg,
    exits_to_compute,
)


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


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
          device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> ConvNormAct:
    return ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, device=device, dtype=dtype)


class ConvBranch(nn.Sequential):
    """[1x1 bottleneck ->] 3x3 conv (stride 2 when it reads the next finer scale)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottleneck: bool, bn_factor: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        dd = {"device": device, "dtype": dtype}
        inner = min(in_chs, bn_factor * out_chs) if bottleneck else in_chs
        layers = [_conv(in_chs, inner, 1, **dd)] if bottleneck else []
        super().__init__(*layers, _conv(inner, out_chs, 3, stride, **dd))


class ScaleUnit(nn.Module):
    """New features at one scale: cat(x, conv(x)), or cat(x, down(finer), conv(x)) when a finer
    scale exists; each branch then gives half of the scale's growth.

    Stochastic depth (`drop_path_rate`) drops a sample's new features at this scale, both
    branches together, keeping the identity: the dense-network form of skipping the layer.
    """

    def __init__(self, cfg: MSDNetConfig, in_width: int, scale: int, has_finer: bool,
                 drop_path_rate: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.drop_path_rate = drop_path_rate
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        g, f = cfg.grow_factors, cfg.bn_factors
        growth = cfg.growth * g[scale]
        self.down = None
        if has_finer:
            self.down = ConvBranch(in_width * g[scale - 1], growth // 2, 2, cfg.bottleneck,
                                   f[scale - 1], **dd)
            growth //= 2
        self.same = ConvBranch(in_width * g[scale], growth, 1, cfg.bottleneck, f[scale], **dd)

    def forward(self, x: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        new = [self.same(x)] if self.down is None else [self.down(finer), self.same(x)]
        if self.drop_path_rate > 0:  # one mask per sample for both branches
            new = [self.drop_path(torch.cat(new, 1))]
        return torch.cat([x, *new], 1)


class MSDLayer(nn.Module):
    """One MSDNet layer: `in_scales` coarsest scales in, `out_scales` out (one fewer when the finest
    is dropped: it is then only read, strided, by the next scale)."""

    def __init__(self, cfg: MSDNetConfig, in_width: int, in_scales: int, out_scales: int,
                 drop_path_rate: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.dropped = in_scales - out_scales
        first = cfg.scales - out_scales  # absolute index of the finest output scale
        self.units = nn.ModuleList(
            ScaleUnit(cfg, in_width, s, has_finer=self.dropped > 0 or s > first,
                      drop_path_rate=drop_path_rate, device=device, dtype=dtype)
            for s in range(first, cfg.scales))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, unit in enumerate(self.units):
            j = i + self.dropped  # this scale's position in `feats`
            out.append(unit(feats[j], feats[j - 1] if j > 0 else None))
        return out


class Transition(nn.ModuleList):
    """A 1x1 conv per surviving scale, cutting the channels to `reduction` of them."""

    def __init__(self, cfg: MSDNetConfig, in_width: int, out_width: int, out_scales: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        g = cfg.grow_factors
        super().__init__(_conv(in_width * g[s], out_width * g[s], 1, device=device, dtype=dtype)
                         for s in range(cfg.scales - out_scales, cfg.scales))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self, feats)]


class FirstLayer(nn.Module):
    """The image -> one feature map per scale, each from the previous (finer) one."""

    def __init__(self, cfg: MSDNetConfig, in_chans: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        widths = [cfg.channels * g for g in cfg.grow_factors]
        if cfg.imagenet_stem:  # the official code's 7x7 conv keeps its bias
            stem = nn.Sequential(ConvNormAct(in_chans, widths[0], 7, stride=2, bias=True, **dd),
                                 nn.MaxPool2d(3, stride=2, padding=1))
        else:
            stem = _conv(in_chans, widths[0], 3, **dd)
        self.convs = nn.ModuleList([stem])
        self.convs.extend(_conv(a, b, 3, 2, **dd) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
        return feats


HEAD_POOLS = ("global", "avg2x2")


def exit_head(in_chs: int, width: int, num_classes: int, pool_type: str = "avg",
              drop_rate: float = 0.0, head_pool: str = "global",
              device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> ExitClassifier:
    """Two 3x3/2 conv-BN-ReLU on the coarsest scale -> pool -> dropout -> linear.

    `head_pool="global"` pools the whole map (`pool_type`, timm's global pool types);
    `"avg2x2"` is the official code's `AvgPool2d(2)` then flatten, which reads only the top-left
    2x2 of the map (the linear layer then needs a 2x2 or 3x3 map). The two agree at the sizes
    the models are trained at, where the map is 2x2 (224 for ImageNet, 32 for CIFAR).
    """
    if head_pool not in HEAD_POOLS:
        raise ValueError(f"head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
    if head_pool == "avg2x2" and pool_type != "avg":
        raise ValueError(f"head_pool='avg2x2' is an average pool; global_pool={pool_type!r} "
                         f"needs head_pool='global'")
    dd = {"device": device, "dtype": dtype}
    pool = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(1)) if head_pool == "avg2x2" else None
    return ExitClassifier([_conv(in_chs, width, 3, 2, **dd), _conv(width, width, 3, 2, **dd)],
                          width, num_classes, pool_type, drop_rate, pool=pool, **dd)


class MSDNet(AnytimeModel):
    """First layer -> blocks of MSD layers (with transitions) -> an exit after every block.

    `head_pool` (default "global"): how each exit pools its last map, see `exit_head`. Global is
    the default because it equals the official `AvgPool2d(2)` bit for bit at the training sizes
    (224, 32), keeps every result obtained so far, and stays a mean over the whole image at any
    other size (a 288 test-time resize, a 64 smoke test), where the official pool would read a
    corner or not fit the linear layer; "avg2x2" reproduces the official code at other sizes.
    `drop_rate`: dropout before every exit's linear layer. `drop_path_rate`: stochastic depth
    over the MSD layers, growing linearly from 0 to this rate at the last layer (timm's rule).
    `global_pool`: timm's pool type for every exit (with head_pool "global").

    Stage outputs (`feature_info`, `features_only=True`): the last feature map of each scale,
    finest first (the finer scales end where pruning drops them; the coarsest is the final
    exit's input), at strides 4, 8, 16, 32 (ImageNet) or 1, 2, 4 (CIFAR).
    """

    def __init__(self, cfg: MSDNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 head_pool: str = "global", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.num_classes = num_classes
        lengths = cfg.block_lengths()
        total, scales = sum(lengths), cfg.scales
        interval = math.ceil(total / scales)  # prune "max": drop the finest scale every interval
        layer_drop_rates = iter(calculate_drop_path_rates(drop_path_rate, total))
        self.first = FirstLayer(cfg, in_chans, **dd)
        self.blocks = nn.ModuleList()
        self.exits = nn.ModuleList()
        width, n = cfg.channels, 0  # scale s has width * grow_factors[s] channels
        # Where each scale's last map is (block, module in block; -1, -1: the first layer), for
        # the stage outputs; the scale's position in the list of maps there; its width.
        last_seen = {s: ((-1, -1), s, width * cfg.grow_factors[s]) for s in range(scales)}
        for b, length in enumerate(lengths):
            block = nn.Sequential()
            for _ in range(length):
                n += 1
                in_scales = scales - max(0, n - 2) // interval
                out_scales = scales - (n - 1) // interval
                block.append(MSDLayer(cfg, width, in_scales, out_scales, next(layer_drop_rates),
                                      **dd))
                width += cfg.growth
                if in_scales > out_scales and cfg.reduction > 0:
                    reduced = math.floor(cfg.reduction * width)
                    block.append(Transition(cfg, width, reduced, out_scales, **dd))
                    width = reduced
                for pos, s in enumerate(range(scales - out_scales, scales)):
                    last_seen[s] = ((b, len(block) - 1), pos, width * cfg.grow_factors[s])
            self.blocks.append(block)
            head_in = width * cfg.grow_factors[-1]
            self.exits.append(exit_head(head_in, cfg.head_channels or head_in, num_classes,
                                        global_pool, drop_rate, head_pool, **dd))
        if out_scales > 1:  # the finer scales' last features would feed nothing (DDP errors)
            raise ValueError(f"{total} layers over {scales} scales leave {out_scales} scales at "
                             f"the end; only the coarsest reaches an exit. Use more layers.")
        self.num_exits = len(self.exits)
        self.exit_positions = [f"block{i + 1}" for i in range(self.num_exits)]
        self.num_features = head_in
        self.head_hidden_size = self.exits[-1].in_features
        stem_stride = 4 if cfg.imagenet_stem else 1
        self.feature_taps = [(where, pos) for where, pos, _ in last_seen.values()]
        self.feature_info = [
            dict(num_chs=chs, reduction=stem_stride * 2 ** s,
                 module="first" if where[0] < 0 else f"blocks.{where[0]}.{where[1]}")
            for s, (where, _, chs) in last_seen.items()]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_exits(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        until = exits_to_compute(until, self.num_exits)
        # Whole blocks run even before an early exit: the finer scales of a block's last layers
        # feed only later exits, but MSDNet's reference costs (SPEC) count whole blocks too.
        feats = self.first(x)
        logits = []
        for block, head in zip(self.blocks[:until], self.exits[:until]):
            for layer in block:
                feats = self._run(layer, feats)
            logits.append(head(feats[-1]))
        return logits

    def forward_features(self, x: torch.Tensor, exit_index: int | None = None) -> torch.Tensor:
        """The coarsest scale after block `exit_index` (default: the last), which that exit's
        head reads; no head runs."""
        feats = self.first(x)
        for block in self.blocks[:exits_to_compute(exit_index, self.num_exits)]:
            for layer in block:
                feats = self._run(layer, feats)
        return feats[-1]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (`feature_info`: each scale's last map, finest first).

        `indices`: the last n if an int, all if None; `norm` has nothing to apply; with
        `stop_early` the layers after the last wanted map are skipped.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        wanted = {self.feature_taps[i][0]: (i, self.feature_taps[i][1]) for i in take_indices}
        stop_at = self.feature_taps[max_index][0] if stop_early else None
        taken: dict[int, torch.Tensor] = {}
        feats = self.first(x)
        where = (-1, -1)
        for b, block in enumerate(self.blocks):
            if where == stop_at:
                break
            for i, layer in enumerate(block):
                if where in wanted:
                    index, pos = wanted[where]
                    taken[index] = feats[pos]
                if where == stop_at:
                    break
                feats = self._run(layer, feats)
                where = (b, i)
        if where in wanted:
            index, pos = wanted[where]
            taken[index] = feats[pos]
        intermediates = [taken[i] for i in sorted(taken)]
        return intermediates if intermediates_only else (feats[-1], intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last wanted map and, with `prune_head`, every exit (the
        model is then a feature backbone: `forward_intermediates` only)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_block, last_module = self.feature_taps[max_index][0]
        self.blocks = self.blocks[:max(last_block, 0) + 1]
        del self.blocks[-1][last_module + 1:]  # (-1, -1): the first layer; no block left
        if prune_head:
            self.exits, self.exit_positions, self.num_exits = nn.ModuleList(), [], 0
        return take_indices


def _build(defaults: MSDNetConfig, variant: str, /, num_classes: int = 1000, in_chans: int = 3,
           drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
           head_pool: str = "global", device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, **architecture: Any) -> MSDNet:
    """`defaults` with the `MSDNetConfig` fields in `architecture` overridden -> MSDNet.
    (Positional-only: `base` is a field of the config.)"""
    for key in ("grow_factors", "bn_factors"):  # YAML and the CLI give lists
        if key in architecture:
            architecture[key] = tuple(architecture[key])
    try:
        cfg = replace(defaults, **architecture)
    except TypeError as e:
        raise TypeError(f"unexpected arguments for {variant}: {e}") from e
    if len(cfg.bn_factors) != cfg.scales:
        raise ValueError(f"{variant}: bn_factors {cfg.bn_factors} need one entry per scale "
                         f"(grow_factors {cfg.grow_factors})")
    return MSDNet(cfg, num_classes, in_chans, drop_rate, drop_path_rate, global_pool, head_pool,
                  device=device, dtype=dtype)


def _create(variant: str, defaults: MSDNetConfig, pretrained: bool, /, **kwargs: Any) -> MSDNet:
    return build_anytime(partial(_build, defaults, variant), variant, pretrained, **kwargs)


def _classifier(num_exits: int) -> tuple[str, ...]:
    return tuple(f"exits.{i}.4" for i in range(num_exits))


default_cfgs = generate_default_cfgs({
    **{name: anytime_cfg(first_conv="first.convs.0.0.conv", classifier=_classifier(5))
       for name in ("msdnet26", "msdnet36", "msdnet41")},
    "msdnet_cifar": cifar_cfg(first_conv="first.convs.0.conv", classifier=_classifier(7)),
})


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
    return _create("msdnet_cifar", cfg, pretrained, **kwargs)
