"""The protocol every anytime network follows, and the cost of each of its exits.

An anytime network is a plain `nn.Module` whose `forward(x, until=None)` returns the logits of its
exits, first to last, computing only what exit `until` (1-based) needs when it is given, and
running exit k's head before any work that only later exits need (what makes it anytime: exit k's
answer is there before the rest is computed). It also names where each exit sits
(`exit_positions`) and keeps its heads in `exits`, which is all that `exit_costs` and `describe`
need.

The registered families also share `AnytimeModel` (timm's model methods, each acting on every
exit, and the single-tensor view for timm's tools: see its docstring and docs/models.md), the one
`until` check (`exits_to_compute`), the exit head (`ExitClassifier`), and how they are built
(`build_anytime`: timm's `build_model_with_cfg` with the pretrained cfgs of `anytime_cfg` /
`cifar_cfg`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, create_classifier, get_device_dtype
from timm.models import PretrainedCfg, build_model_with_cfg, checkpoint, get_pretrained_cfg
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@runtime_checkable
class AnytimeNet(Protocol):
    num_exits: int
    exit_positions: list[str]  # where each exit sits, e.g. "stage2.unit3"
    exits: nn.ModuleList  # the exit heads, first to last

    # With no `until`, an `AnytimeModel` whose single-tensor view is on (`set_output_exit`)
    # gives one tensor: code that needs the list passes `until` (`num_exits` for all of them).
    def forward(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]: ...


# CIFAR-10 channel statistics (training set), for the CIFAR models' pretrained cfgs: what
# `timm.data.resolve_model_data_config` hands to a loader for them.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def exits_to_compute(until: int | None, num_exits: int) -> int:
    """How many exits `forward(x, until)` computes: every one for None, else `until` (1-based).

    `torch.fx.symbolic_trace` hands `until` in as a Proxy of its default; that traces the default
    (every exit). Trace an earlier exit with `concrete_args={"until": k}`.
    """
    if until is None or isinstance(until, torch.fx.Proxy):
        return num_exits
    if not 1 <= until <= num_exits:
        raise ValueError(f"until={until} is not an exit of this model (1..{num_exits})")
    return until


class ExitClassifier(nn.Sequential):
    """An exit head: its own layers (`pre`: activation, convs) -> pool -> dropout -> linear.

    The interface is that of timm's `ClassifierHead` (`forward(x, pre_logits)`, `reset`, `fc`,
    `global_pool`), so a model treats every exit head alike. It stays a Sequential so that the
    state_dict keys are those the heads always had (`exits.3.4.weight`).
    """

    def __init__(self, pre: list[nn.Module], in_features: int, num_classes: int,
                 pool_type: str = "avg", drop_rate: float = 0.0, pool: nn.Module | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        global_pool, fc = create_classifier(in_features, num_classes, pool_type, device=device,
                                            dtype=dtype)
        super().__init__(*pre, global_pool if pool is None else pool, nn.Dropout(drop_rate), fc)
        self.in_features = in_features

    @property
    def global_pool(self) -> nn.Module:
        return self[-3]

    @property
    def fc(self) -> nn.Module:
        return self[-1]

    def reset(self, num_classes: int, pool_type: str | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """A new linear layer for `num_classes` (0: none); a new global pool if `pool_type`.
        The layer's device and dtype: those given, else the head's (as timm's `ClassifierHead`;
        a head with no parameter left needs them given: `AnytimeModel.reset_classifier` does)."""
        if pool_type is not None:
            self[-3] = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        dd = get_device_dtype(self, device=device, dtype=dtype)
        feat_mult = getattr(self.global_pool, "feat_mult", lambda: 1)()
        fc = nn.Linear(self.in_features * feat_mult, num_classes, **dd) if num_classes > 0 \
            else nn.Identity()
        self[-1] = fc.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        *features, fc = self
        for module in features:
            x = module(x)
        return x if pre_logits else fc(x)


class AnytimeModel(nn.Module):
    """What the anytime families share: timm's model methods, each acting on every exit.

    A subclass sets `num_classes`, `num_features` (width of the final exit's input),
    `head_hidden_size` (width of its pre-logits), `exits` (`ExitClassifier` or timm
    `ClassifierHead` modules), `num_exits`, `exit_positions` and `feature_info`, builds every
    parameter with the `device` and `dtype` it is given (as timm's models do), and implements
    `forward_exits(x, until=None)` (the list of exits 1..until), `forward_features(x,
    exit_index=None)` and `forward_intermediates`.

    - `forward(x, until=None)`: `forward_exits`, the list of every exit's logits (training, the
      budgeted evaluation, `exit_costs`, EANN). The single-tensor view for timm's tools, which
      expect `model(x)` to be one tensor (validate.py, benchmark.py, exporters), as timm's own
      multi-output models make their extra outputs opt-in: after `set_output_exit(k)`
      (`output_exit=k` in `timm.create_model`), `model(x)` is exit k's logits alone (1-based, -1:
      the final exit), computing only what exit k needs. An explicit `until` still gives the
      list, so code that needs every exit can ask for it whatever the view.

    - `get_classifier()`: every exit's final linear layer, as a ModuleList (names with
      `name_only=True`, the same tuple as `pretrained_cfg["classifier"]`).
    - `reset_classifier(num_classes, global_pool=None)`: a new linear layer in every exit (and a
      new global pool in every exit when `global_pool` is given; None keeps each exit's pool).
    - `forward_features(x, exit_index=None)`: what exit `exit_index` (1-based; default the final
      exit) consumes, computing only what it needs and no head.
    - `forward_head(x, pre_logits=False, exit_index=None)`: that exit's head on it.
    - `set_grad_checkpointing(enable=True)`: recompute each residual unit (ResNet-ANN) or MSD layer
      (MSDNet) in the backward pass instead of storing its activations; heads are not recomputed.
    """

    num_classes: int
    num_features: int
    head_hidden_size: int
    num_exits: int
    exit_positions: list[str]
    exits: nn.ModuleList
    grad_checkpointing: bool = False
    output_exit: int | None = None  # the single-tensor view's exit; None: the list

    def forward(self, x: torch.Tensor,
                until: int | None = None) -> list[torch.Tensor] | torch.Tensor:
        """The logits of exits 1..`until` (every exit by default), first to last, computing only
        what exit `until` needs; with no `until` and the single-tensor view on
        (`set_output_exit`), that exit's logits as one tensor."""
        # fx's symbolic_trace hands the default `until` in as a Proxy: trace it as not given.
        if self.output_exit is not None and (until is None or isinstance(until, torch.fx.Proxy)):
            k = self.num_exits if self.output_exit == -1 else self.output_exit
            return self.forward_head(self.forward_features(x, exit_index=k), exit_index=k)
        return self.forward_exits(x, until)

    def forward_exits(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]:
        """The logits of exits 1..`until` (every exit by default), whatever the view: each
        family implements it."""
        raise NotImplementedError

    def set_output_exit(self, exit_index: int | None) -> None:
        """The single-tensor view: `model(x)` gives exit `exit_index`'s logits alone (1-based;
        -1: the final exit); None gives back the list of every exit (the default)."""
        if exit_index is not None and exit_index != -1 and \
                not 1 <= exit_index <= self.num_exits:
            raise ValueError(f"output_exit={exit_index} is not an exit of this model: 1.."
                             f"{self.num_exits}, -1 for the final exit, or None for the list of "
                             f"every exit")
        self.output_exit = exit_index

    def _run(self, module: nn.Module, *args: object) -> object:
        """`module(*args)`, recomputed in the backward pass when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.ModuleList | tuple[str, ...]:
        if name_only:
            return tuple(f"exits.{i}.{_child_name(head, head.fc)}"
                         for i, head in enumerate(self.exits))
        return nn.ModuleList(head.fc for head in self.exits)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        # The model's device and dtype: a head whose linear layer was reset to Identity (0
        # classes) may have no parameter left to take them from.
        dd = get_device_dtype(self)
        for head in self.exits:
            head.reset(num_classes, global_pool, **dd)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     exit_index: int | None = None) -> torch.Tensor:
        """Exit `exit_index`'s head (1-based; default the final exit) on what
        `forward_features(x, exit_index)` returned: logits, or the pooled features before the
        linear layer with `pre_logits=True`."""
        k = exits_to_compute(exit_index, self.num_exits)
        return self.exits[k - 1](x, pre_logits=pre_logits)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, module in parent.named_children() if module is child)


def anytime_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg for an anytime model with no published weights (no url, no hub id:
    `pretrained=True` ends in timm's own "No pretrained weights exist" error, with no download).
    ImageNet defaults: the reference training's 224 centre crop of a 256 resize, bilinear."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv1", "classifier": "exits",
            "license": "mit", **kwargs}


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """32x32 CIFAR images, used whole (crop_pct 1), CIFAR-10 statistics, 10 classes."""
    return anytime_cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                       mean=CIFAR10_MEAN, std=CIFAR10_STD, **kwargs)


def build_anytime(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool,
                  feature_cfg: dict[str, Any] | None = None, output_exit: int | None = None,
                  **kwargs: Any) -> nn.Module:
    """timm's `build_model_with_cfg`, with `features_only` served by timm's `FeatureGetterNet`
    (`forward_intermediates`), `pretrained_cfg["classifier"]` naming the built model's exits
    (their number depends on the arguments), and `output_exit` switching the single-tensor view
    on (`AnytimeModel.set_output_exit`)."""
    if output_exit is not None and kwargs.get("features_only"):
        raise ValueError(f"{variant}: output_exit selects an exit's logits, features_only gives "
                         f"stage outputs and no exit; pass one of them")
    # out_indices None: every stage output (timm's default, 0..4, fits no family here).
    feature_cfg = {"feature_cls": "getter", "out_indices": None, **(feature_cfg or {})}
    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                 **kwargs)
    if isinstance(model, AnytimeModel):
        model.pretrained_cfg["classifier"] = model.get_classifier(name_only=True)
        model.set_output_exit(output_exit)
    return model


@dataclass
class ExitCost:
    index: int  # 1-based
    position: str
    macs: int  # cumulative multiply-adds up to this exit, counting every earlier head
    macs_own_head: int  # the same, but counting only this exit's head (a caller that skips heads)
    params: int  # cumulative parameters needed up to this exit (all earlier heads included)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}


def pretrained_cfg(model_name: str) -> PretrainedCfg | None:
    """timm's pretrained cfg of a model name (an anytime model or any of timm's): input size,
    mean, std, classes. None for a name timm does not know; the trainer names the known ones."""
    try:
        return get_pretrained_cfg(model_name)
    except RuntimeError:  # "resnet50.nope": a pretrained tag timm does not know
        return None


def exit_costs(model: nn.Module, input_size: tuple[int, int, int]) -> list[ExitCost]:
    """Count each exit's cumulative cost for one image of `input_size` (C, H, W).

    Multiply-adds are torch's FLOP counter over matmuls and convolutions, halved; element-wise
    work (norms, activations, pooling) is not counted. Parameters are those of every module that
    ran, found with forward hooks, so a model needs nothing beyond the protocol.

    One forward counts every exit: a hook on each head reads the running totals when the head
    finishes. That equals a forward `until` that exit because the protocol runs exit k's head
    before any work that only later exits need (test_models checks it against `until=k`).
    """
    assert isinstance(model, AnytimeNet), f"{type(model).__name__} is not an AnytimeNet"
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    names = {m: f"{type(model).__name__}.{n}" if n else type(model).__name__
             for n, m in model.named_modules()}
    counter = FlopCounterMode(display=False)
    ran: set[nn.Module] = set()
    costs: list[ExitCost] = []
    earlier_heads = 0
    exit_of = {head: k for k, head in enumerate(model.exits, 1)}

    def head_done(head: nn.Module, _args: Any, _out: Any) -> None:
        nonlocal earlier_heads
        k = exit_of[head]
        if k != len(costs) + 1:
            raise ValueError(f"{type(model).__name__}: its exit heads ran out of order (exit "
                             f"{k}'s where exit {len(costs) + 1}'s was due); an anytime "
                             "network runs them first to last, once each")
        macs = counter.get_total_flops() // 2
        params = sum(p.numel() for m in ran for p in m.parameters(recurse=False))
        costs.append(ExitCost(k, model.exit_positions[k - 1], macs, macs - earlier_heads,
                              params))
        earlier_heads += sum(counter.get_flop_counts().get(names[head], {}).values()) // 2

    hooks = [m.register_forward_pre_hook(lambda m, _: ran.add(m)) for m in model.modules()]
    hooks += [head.register_forward_hook(head_done) for head in model.exits]
    try:
        with torch.no_grad(), counter:
            model(x, until=model.num_exits)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if len(costs) != model.num_exits:
        raise ValueError(f"{type(model).__name__}: {len(costs)} exit heads ran, not "
                         f"{model.num_exits}")
    return costs
