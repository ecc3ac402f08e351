"""ResNet-ANN: a residual network with an exit after every s-th unit.

CIFAR style (SPEC section 4, the authors' layout): a 3x3 stem with `width` channels, three stages
of n pre-activation basic units (timm's `PreActBasic`), stages 2 and 3 at stride 2 with doubled
channels, depth = 6n + 2. Each exit head is ReLU -> global average pool -> linear, with no BN.

    import pipeline.models, timm
    model = timm.create_model("resnet_ann_cifar20", num_classes=10)    # 9 exits
    model = timm.create_model("resnet_ann_cifar", depth=110, exit_every=3)
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import register_model
from timm.models.resnetv2 import DownsampleConv, PreActBasic
from torch import nn


class ExitHead(nn.Sequential):
    """ReLU -> global average pool -> linear."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(in_chs, num_classes))


class ResNetANN(nn.Module):
    """Stem -> residual units (flattened over stages) -> an exit after the chosen units."""

    def __init__(
        self,
        stem: nn.Module,
        stages: list[list[nn.Module]],
        stage_channels: list[int],
        num_classes: int,
        exit_every: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.stem = stem
        self.units = nn.ModuleList(unit for stage in stages for unit in stage)
        names = [f"stage{s + 1}.unit{u + 1}" for s, stage in enumerate(stages)
                 for u in range(len(stage))]
        channels = [c for stage, c in zip(stages, stage_channels) for _ in stage]
        # Exits every `exit_every` units counted back from the last, so the last unit has one.
        last = len(self.units) - 1
        self.exit_after = sorted(range(last, -1, -exit_every))
        self.exits = nn.ModuleList(ExitHead(channels[i], num_classes) for i in self.exit_after)
        self.exit_positions = [names[i] for i in self.exit_after]
        self.num_exits = len(self.exits)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        until = self.num_exits if until is None else until
        if not 1 <= until <= self.num_exits:
            raise ValueError(f"until={until} is not an exit of this model (1..{self.num_exits})")
        x = self.stem(x)
        logits = []
        next_exit = 0
        for i, unit in enumerate(self.units):
            x = unit(x)
            if i == self.exit_after[next_exit]:
                logits.append(self.exits[next_exit](x))
                next_exit += 1
                if next_exit == until:
                    break
        return logits


def _cifar_resnet_ann(depth: int = 20, width: int = 16, num_classes: int = 10,
                      in_chans: int = 3, exit_every: int = 1, **kwargs) -> ResNetANN:
    if kwargs.pop("pretrained", False):
        raise ValueError("no pretrained weights exist for resnet_ann_cifar")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)  # passed by timm.create_model; no weights to fetch here
    if kwargs:
        raise TypeError(f"unexpected arguments for resnet_ann_cifar: {', '.join(kwargs)}")
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet-ANN depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    unit = partial(PreActBasic, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                   proj_layer=DownsampleConv)
    channels = [width, 2 * width, 4 * width]
    stages, in_chs = [], width
    for s, out_chs in enumerate(channels):
        stride = 1 if s == 0 else 2
        stages.append([unit(in_chs if u == 0 else out_chs, out_chs, stride=stride if u == 0 else 1)
                       for u in range(n)])
        in_chs = out_chs
    stem = create_conv2d(in_chans, width, 3)
    return ResNetANN(stem, stages, channels, num_classes, exit_every)


@register_model
def resnet_ann_cifar(pretrained: bool = False, **kwargs) -> ResNetANN:
    """CIFAR-style ResNet-ANN of any depth 6n+2 (`depth=`, default 20)."""
    return _cifar_resnet_ann(pretrained=pretrained, **kwargs)


@register_model
def resnet_ann_cifar20(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _cifar_resnet_ann(depth=20, pretrained=pretrained, **kwargs)


@register_model
def resnet_ann_cifar32(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _cifar_resnet_ann(depth=32, pretrained=pretrained, **kwargs)


@register_model
def resnet_ann_cifar56(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _cifar_resnet_ann(depth=56, pretrained=pretrained, **kwargs)


@register_model
def resnet_ann_cifar110(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _cifar_resnet_ann(depth=110, pretrained=pretrained, **kwargs)
