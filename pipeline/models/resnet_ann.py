"""ResNet-ANN: a residual network with an exit after every s-th unit.

CIFAR style (SPEC section 4, the authors' layout): a 3x3 stem with `width` channels, three stages
of n pre-activation basic units (timm's `PreActBasic`), stages 2 and 3 at stride 2 with doubled
channels, depth = 6n + 2. Each exit head is ReLU -> global average pool -> linear, with no BN.

ImageNet style: timm's own ResNet (7x7 stem + max-pool, `BasicBlock` / `Bottleneck` stages
layer1..layer4) with an exit after every s-th residual block counted back from the last block.
`resnetXX_ann` uses the reference spacing (18, 34, 50: s=2; 101: s=3; 152: s=5); `resnetXX_opt`
is the same network with only the final exit, i.e. timm's `resnetXX` (same parameters and MACs).

    import pipeline.models, timm
    model = timm.create_model("resnet_ann_cifar20", num_classes=10)    # 9 exits
    model = timm.create_model("resnet_ann_cifar", depth=110, exit_every=3)
    model = timm.create_model("resnet50_ann", num_classes=1000)        # 8 exits
    model = timm.create_model("resnet101_ann", exit_every=2)           # 17 exits
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from timm.layers import BatchNormAct2d, ClassifierHead, create_conv2d
from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import DownsampleConv, PreActBasic
from torch import nn

from pipeline.models.anytime import refuse_pretrained


class ExitHead(nn.Sequential):
    """ReLU -> global average pool -> linear."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(in_chs, num_classes))


class ResNetANN(nn.Module):
    """Stem -> residual units (flattened over stages) -> an exit after the chosen units.

    Both styles share this class; they differ in the stem, the units, the head (`head_fn(in_chs,
    num_classes)`) and how positions are named (`position_names`: stage and unit prefixes, both
    1-based, e.g. "stage2.unit3" or "layer3.block2").
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[list[nn.Module]],
        stage_channels: list[int],
        num_classes: int,
        exit_every: int = 1,
        head_fn: Callable[[int, int], nn.Module] = ExitHead,
        position_names: tuple[str, str] = ("stage", "unit"),
        init_convs: bool = True,
    ):
        super().__init__()
        if exit_every < 1:
            raise ValueError(f"exit_every must be >= 1, got {exit_every}")
        self.num_classes = num_classes
        self.stem = stem
        self.units = nn.ModuleList(unit for stage in stages for unit in stage)
        stage_name, unit_name = position_names
        names = [f"{stage_name}{s + 1}.{unit_name}{u + 1}" for s, stage in enumerate(stages)
                 for u in range(len(stage))]
        channels = [c for stage, c in zip(stages, stage_channels) for _ in stage]
        # Exits every `exit_every` units counted back from the last, so the last unit has one.
        last = len(self.units) - 1
        self.exit_after = sorted(range(last, -1, -exit_every))
        self.exits = nn.ModuleList(head_fn(channels[i], num_classes) for i in self.exit_after)
        self.exit_positions = [names[i] for i in self.exit_after]
        self.num_exits = len(self.exits)
        if init_convs:  # off when the units come initialised already (timm's ResNet)
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
    refuse_pretrained("resnet_ann_cifar", kwargs.pop("pretrained", False), kwargs)
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


# depth: (block, blocks per stage, reference exit spacing s of SPEC section 4)
IMAGENET_LAYOUTS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int], int]] = {
    18: (BasicBlock, (2, 2, 2, 2), 2),  # 8 blocks -> 4 exits
    34: (BasicBlock, (3, 4, 6, 3), 2),  # 16 blocks -> 8 exits
    50: (Bottleneck, (3, 4, 6, 3), 2),  # 16 blocks -> 8 exits
    101: (Bottleneck, (3, 4, 23, 3), 3),  # 33 blocks -> 11 exits
    152: (Bottleneck, (3, 8, 36, 3), 5),  # 50 blocks -> 10 exits
}


def _imagenet_resnet_ann(depth: int, exit_every: int | None = None, single_exit: bool = False,
                         num_classes: int = 1000, drop_rate: float = 0.0,
                         global_pool: str = "avg", **kwargs) -> ResNetANN:
    name = f"resnet{depth}_{'opt' if single_exit else 'ann'}"
    refuse_pretrained(name, kwargs.pop("pretrained", False), kwargs)
    if depth not in IMAGENET_LAYOUTS:
        raise ValueError(f"ImageNet ResNet-ANN depth must be one of {sorted(IMAGENET_LAYOUTS)}, "
                         f"got {depth}")
    block, layers, reference_every = IMAGENET_LAYOUTS[depth]
    if single_exit:
        if exit_every is not None:
            raise TypeError(f"{name} has a single exit; use resnet{depth}_ann for exit_every")
        exit_every = sum(layers)
    # timm builds and initialises the backbone (kaiming convs, zero-initialised last BN of each
    # block); the rest of kwargs (drop_path_rate, stem_type, avg_down, ...) go to it unchanged so
    # that variants stay timm's. Its own classifier is dropped (num_classes=0).
    try:
        net = ResNet(block=block, layers=layers, num_classes=0, **kwargs)
    except TypeError as e:
        raise TypeError(f"unexpected arguments for {name}: {e}") from e
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, act1=net.act1,
                                     maxpool=net.maxpool))
    stages = [list(getattr(net, f"layer{i}")) for i in range(1, 5)]
    channels = [info["num_chs"] for info in net.feature_info[1:]]
    # timm's blocks are post-activation (they end with ReLU after the residual add), so the head
    # is timm's plain classifier, pool -> (dropout) -> linear, exactly timm's ResNet head; the
    # pre-activation CIFAR units instead need the ReLU that ExitHead adds.
    head_fn = partial(ClassifierHead, pool_type=global_pool, drop_rate=drop_rate)
    return ResNetANN(stem, stages, channels, num_classes,
                     reference_every if exit_every is None else exit_every, head_fn=head_fn,
                     position_names=("layer", "block"), init_convs=False)


@register_model
def resnet18_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-18-ANN: an exit after every 2nd block (4 exits)."""
    return _imagenet_resnet_ann(18, pretrained=pretrained, **kwargs)


@register_model
def resnet34_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-34-ANN: an exit after every 2nd block (8 exits)."""
    return _imagenet_resnet_ann(34, pretrained=pretrained, **kwargs)


@register_model
def resnet50_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-50-ANN: an exit after every 2nd block (8 exits)."""
    return _imagenet_resnet_ann(50, pretrained=pretrained, **kwargs)


@register_model
def resnet101_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-101-ANN: an exit after every 3rd block (11 exits)."""
    return _imagenet_resnet_ann(101, pretrained=pretrained, **kwargs)


@register_model
def resnet152_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-152-ANN: an exit after every 5th block (10 exits)."""
    return _imagenet_resnet_ann(152, pretrained=pretrained, **kwargs)


@register_model
def resnet18_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-18 with its final exit only: timm's resnet18 as an anytime net (OPT baseline)."""
    return _imagenet_resnet_ann(18, single_exit=True, pretrained=pretrained, **kwargs)


@register_model
def resnet34_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-34 with its final exit only (OPT baseline)."""
    return _imagenet_resnet_ann(34, single_exit=True, pretrained=pretrained, **kwargs)


@register_model
def resnet50_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-50 with its final exit only (OPT baseline)."""
    return _imagenet_resnet_ann(50, single_exit=True, pretrained=pretrained, **kwargs)


@register_model
def resnet101_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-101 with its final exit only (OPT baseline)."""
    return _imagenet_resnet_ann(101, single_exit=True, pretrained=pretrained, **kwargs)


@register_model
def resnet152_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-152 with its final exit only (OPT baseline)."""
    return _imagenet_resnet_ann(152, single_exit=True, pretrained=pretrained, **kwargs)
