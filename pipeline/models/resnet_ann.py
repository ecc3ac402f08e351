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

Every name takes timm's `num_classes`, `in_chans`, `drop_rate` (dropout before every exit's
linear layer, 0), `drop_path_rate` (stochastic depth over the residual units, rising linearly to
this rate at the last unit, 0), `global_pool` (every exit's pool, "avg"), `features_only`
(stage outputs: the stem's, then each stage's last unit's), `device` and `dtype` (of every
parameter) and `output_exit` (the single-tensor view). The timm methods act on every exit
(`AnytimeModel`, docs/models.md): `forward_features(x, exit_index=None)` is the output of the unit
that exit `exit_index` (default the final one) reads, `forward_head` that exit's head,
`get_classifier` / `reset_classifier` every exit's linear layer, and `set_grad_checkpointing`
recomputes each residual unit in the backward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.layers import BatchNormAct2d, ClassifierHead, calculate_drop_path_rates, create_conv2d
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import DownsampleConv, PreActBasic
from torch import nn

from pipeline.models.anytime import (
    AnytimeModel,
    ExitClassifier,
    anytime_cfg,
    build_anytime,
    cifar_cfg,
    exits_to_compute,
)


def cifar_exit_head(in_chs: int, num_classes: int, pool_type: str = "avg",
                    drop_rate: float = 0.0, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> ExitClassifier:
    """ReLU -> global pool -> dropout -> linear: the pre-activation units' output needs the ReLU."""
    return ExitClassifier([nn.ReLU()], in_chs, num_classes, pool_type, drop_rate, device=device,
                          dtype=dtype)


class ResNetANN(AnytimeModel):
    """Stem -> residual units (flattened over stages) -> an exit after the chosen units.

    Both styles share this class; they differ in the stem (and `stem_pool`, the ImageNet stem's
    max-pool, kept apart so the stem's own output is a feature map as in timm's ResNet), the
    units, the head (`head_fn(in_chs, num_classes, device=..., dtype=...)`), how positions are
    named (`position_names`: stage and unit prefixes, both 1-based, e.g. "stage2.unit3" or
    "layer3.block2") and each stage's stride from the image (`reductions`, the stem's first).
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[list[nn.Module]],
        stage_channels: list[int],
        num_classes: int,
        exit_every: int = 1,
        head_fn: Callable[[int, int], nn.Module] = cifar_exit_head,
        position_names: tuple[str, str] = ("stage", "unit"),
        init_convs: bool = True,
        stem_pool: nn.Module | None = None,
        stem_channels: int = 16,
        reductions: tuple[int, ...] = (1, 1, 2, 4),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}  # the exit heads'; the rest comes built
        if exit_every < 1:
            raise ValueError(f"exit_every must be >= 1, got {exit_every}")
        self.num_classes = num_classes
        self.stem = stem
        self.stem_pool = stem_pool or nn.Identity()
        self.units = nn.ModuleList(unit for stage in stages for unit in stage)
        stage_name, unit_name = position_names
        names = [f"{stage_name}{s + 1}.{unit_name}{u + 1}" for s, stage in enumerate(stages)
                 for u in range(len(stage))]
        channels = [c for stage, c in zip(stages, stage_channels) for _ in stage]
        # Exits every `exit_every` units counted back from the last, so the last unit has one.
        last = len(self.units) - 1
        self.exit_after = sorted(range(last, -1, -exit_every))
        self.exits = nn.ModuleList(head_fn(channels[i], num_classes, **dd)
                                   for i in self.exit_after)
        self.exit_positions = [names[i] for i in self.exit_after]
        self.num_exits = len(self.exits)
        self.num_features = self.head_hidden_size = channels[-1]
        # Stage outputs for features_only: the stem's, then each stage's last unit's.
        stage_ends = [sum(len(st) for st in stages[:s + 1]) - 1 for s in range(len(stages))]
        self.feature_units = stage_ends  # feature i + 1 is the output of unit feature_units[i]
        self.feature_info = [dict(num_chs=stem_channels, reduction=reductions[0], module="stem")]
        self.feature_info += [dict(num_chs=c, reduction=r, module=f"units.{i}")
                              for c, r, i in zip(stage_channels, reductions[1:], stage_ends)]
        if init_convs:  # off when the units come initialised already (timm's ResNet)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_exits(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        until = exits_to_compute(until, self.num_exits)
        x = self.stem_pool(self.stem(x))
        logits = []
        next_exit = 0
        for i, unit in enumerate(self.units):
            x = self._run(unit, x)
            if i == self.exit_after[next_exit]:
                logits.append(self.exits[next_exit](x))
                next_exit += 1
                if next_exit == until:
                    break
        return logits

    def forward_features(self, x: torch.Tensor, exit_index: int | None = None) -> torch.Tensor:
        """The input of exit `exit_index` (default: the final exit), the units up to it only."""
        last_unit = self.exit_after[exits_to_compute(exit_index, self.num_exits) - 1]
        x = self.stem_pool(self.stem(x))
        for unit in self.units[:last_unit + 1]:
            x = self._run(unit, x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (`feature_info`: the stem's, then each stage's), as timm's ResNet.

        `indices`: the last n if an int, all if None; `norm` has nothing to apply (no final
        norm); with `stop_early` the units after the last wanted stage are skipped.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        last_unit = len(self.units) - 1
        if stop_early:
            last_unit = self.feature_units[max_index - 1] if max_index else -1
        for i, unit in enumerate(self.units[:last_unit + 1]):
            x = self._run(unit, x)
            if i in self.feature_units and self.feature_units.index(i) + 1 in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the units after the last wanted stage output and, with `prune_head`, every exit
        (the model is then a feature backbone: `forward_intermediates` only)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_unit = self.feature_units[max_index - 1] if max_index else -1
        self.units = self.units[:last_unit + 1]
        if prune_head:
            self.exits, self.exit_after, self.exit_positions = nn.ModuleList(), [], []
            self.num_exits = 0
        return take_indices


def _cifar_resnet_ann(depth: int = 20, width: int = 16, num_classes: int = 10,
                      in_chans: int = 3, exit_every: int = 1, drop_rate: float = 0.0,
                      drop_path_rate: float = 0.0, global_pool: str = "avg",
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> ResNetANN:
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet-ANN depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    dd = {"device": device, "dtype": dtype}
    unit = partial(PreActBasic, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                   proj_layer=DownsampleConv, **dd)
    # Stochastic depth: the drop rate grows linearly from 0 at the first unit (timm's rule).
    unit_drop_rates = iter(calculate_drop_path_rates(drop_path_rate, 3 * n))
    channels = [width, 2 * width, 4 * width]
    stages, in_chs = [], width
    for s, out_chs in enumerate(channels):
        stride = 1 if s == 0 else 2
        stages.append([unit(in_chs if u == 0 else out_chs, out_chs, stride=stride if u == 0 else 1,
                            drop_path_rate=next(unit_drop_rates)) for u in range(n)])
        in_chs = out_chs
    stem = create_conv2d(in_chans, width, 3, **dd)
    head_fn = partial(cifar_exit_head, pool_type=global_pool, drop_rate=drop_rate)
    return ResNetANN(stem, stages, channels, num_classes, exit_every, head_fn=head_fn,
                     stem_channels=width, reductions=(1, 1, 2, 4), **dd)


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
                         global_pool: str = "avg", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None, **kwargs) -> ResNetANN:
    name = f"resnet{depth}_{'opt' if single_exit else 'ann'}"
    block, layers, reference_every = IMAGENET_LAYOUTS[depth]
    if single_exit:
        if exit_every is not None:
            raise TypeError(f"{name} has a single exit; use resnet{depth}_ann for exit_every")
        exit_every = sum(layers)
    # timm builds and initialises the backbone (kaiming convs, zero-initialised last BN of each
    # block); the rest of kwargs (drop_path_rate, drop_block_rate, stem_type, avg_down, ...) go to
    # it unchanged so that variants stay timm's. Its own classifier is dropped (num_classes=0).
    dd = {"device": device, "dtype": dtype}
    try:
        net = ResNet(block=block, layers=layers, num_classes=0, **dd, **kwargs)
    except TypeError as e:
        raise TypeError(f"unexpected arguments for {name}: {e}") from e
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, act1=net.act1))
    stages = [list(getattr(net, f"layer{i}")) for i in range(1, 5)]
    stem_info, *stage_info = net.feature_info
    # timm's blocks are post-activation (they end with ReLU after the residual add), so the head
    # is timm's plain classifier, pool -> (dropout) -> linear, exactly timm's ResNet head; the
    # pre-activation CIFAR units instead need the ReLU that cifar_exit_head adds.
    head_fn = partial(ClassifierHead, pool_type=global_pool, drop_rate=drop_rate)
    return ResNetANN(stem, stages, [info["num_chs"] for info in stage_info], num_classes,
                     reference_every if exit_every is None else exit_every, head_fn=head_fn,
                     position_names=("layer", "block"), init_convs=False,
                     stem_pool=net.maxpool, stem_channels=stem_info["num_chs"],
                     reductions=tuple(info["reduction"] for info in net.feature_info), **dd)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ResNetANN:
    if variant.startswith("resnet_ann_cifar"):
        return build_anytime(_cifar_resnet_ann, variant, pretrained, **kwargs)
    depth, kind = int(variant[len("resnet"):].split("_")[0]), variant.split("_")[1]
    return build_anytime(partial(_imagenet_resnet_ann, depth, single_exit=kind == "opt"),
                         variant, pretrained, **kwargs)


def _cfg_classifier(num_exits: int, fc_name: str) -> tuple[str, ...]:
    return tuple(f"exits.{i}.{fc_name}" for i in range(num_exits))


def _imagenet_exits(depth: int, single_exit: bool) -> int:
    _, layers, every = IMAGENET_LAYOUTS[depth]
    return 1 if single_exit else len(range(sum(layers) - 1, -1, -every))


default_cfgs = generate_default_cfgs({
    **{name: cifar_cfg(first_conv="stem", classifier=_cfg_classifier(3 * ((depth - 2) // 6), "3"))
       for name, depth in [("resnet_ann_cifar", 20), ("resnet_ann_cifar20", 20),
                           ("resnet_ann_cifar32", 32), ("resnet_ann_cifar56", 56),
                           ("resnet_ann_cifar110", 110)]},
    **{f"resnet{depth}_{kind}": anytime_cfg(
        first_conv="stem.conv1", classifier=_cfg_classifier(_imagenet_exits(depth, kind == "opt"),
                                                            "fc"))
       for depth in IMAGENET_LAYOUTS for kind in ("ann", "opt")},
})


@register_model
def resnet_ann_cifar(pretrained: bool = False, **kwargs) -> ResNetANN:
    """CIFAR-style ResNet-ANN of any depth 6n+2 (`depth=`, default 20)."""
    return _create("resnet_ann_cifar", pretrained, **kwargs)


@register_model
def resnet_ann_cifar20(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _create("resnet_ann_cifar20", pretrained, depth=20, **kwargs)


@register_model
def resnet_ann_cifar32(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _create("resnet_ann_cifar32", pretrained, depth=32, **kwargs)


@register_model
def resnet_ann_cifar56(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _create("resnet_ann_cifar56", pretrained, depth=56, **kwargs)


@register_model
def resnet_ann_cifar110(pretrained: bool = False, **kwargs) -> ResNetANN:
    return _create("resnet_ann_cifar110", pretrained, depth=110, **kwargs)


@register_model
def resnet18_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-18-ANN: an exit after every 2nd block (4 exits)."""
    return _create("resnet18_ann", pretrained, **kwargs)


@register_model
def resnet34_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-34-ANN: an exit after every 2nd block (8 exits)."""
    return _create("resnet34_ann", pretrained, **kwargs)


@register_model
def resnet50_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-50-ANN: an exit after every 2nd block (8 exits)."""
    return _create("resnet50_ann", pretrained, **kwargs)


@register_model
def resnet101_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-101-ANN: an exit after every 3rd block (11 exits)."""
    return _create("resnet101_ann", pretrained, **kwargs)


@register_model
def resnet152_ann(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-152-ANN: an exit after every 5th block (10 exits)."""
    return _create("resnet152_ann", pretrained, **kwargs)


@register_model
def resnet18_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-18 with its final exit only: timm's resnet18 as an anytime net (OPT baseline)."""
    return _create("resnet18_opt", pretrained, **kwargs)


@register_model
def resnet34_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-34 with its final exit only (OPT baseline)."""
    return _create("resnet34_opt", pretrained, **kwargs)


@register_model
def resnet50_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-50 with its final exit only (OPT baseline)."""
    return _create("resnet50_opt", pretrained, **kwargs)


@register_model
def resnet101_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-101 with its final exit only (OPT baseline)."""
    return _create("resnet101_opt", pretrained, **kwargs)


@register_model
def resnet152_opt(pretrained: bool = False, **kwargs) -> ResNetANN:
    """ResNet-152 with its final exit only (OPT baseline)."""
    return _create("resnet152_opt", pretrained, **kwargs)
