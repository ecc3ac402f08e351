"""The protocol every anytime network follows, and the cost of each of its exits.

An anytime network is a plain `nn.Module` whose `forward(x, until=None)` returns the logits of its
exits, first to last, computing only what exit `until` (1-based) needs when it is given. It also
names where each exit sits (`exit_positions`) and keeps its heads in `exits`, which is all that
`exit_costs` and `describe` need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@runtime_checkable
class AnytimeNet(Protocol):
    num_exits: int
    exit_positions: list[str]  # where each exit sits, e.g. "stage2.unit3"
    exits: nn.ModuleList  # the exit heads, first to last

    def forward(self, x: torch.Tensor, until: int | None = None) -> list[torch.Tensor]: ...


def refuse_pretrained(name: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """No weights exist for these models: refuse `pretrained=True`, and drop the pretrained-config
    arguments that `timm.create_model` passes to every model function."""
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {name}")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)


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


def exit_costs(model: nn.Module, input_size: tuple[int, int, int]) -> list[ExitCost]:
    """Count each exit's cumulative cost for one image of `input_size` (C, H, W).

    Multiply-adds are torch's FLOP counter over matmuls and convolutions, halved; element-wise
    work (norms, activations, pooling) is not counted. Parameters are those of every module that
    ran, found with forward hooks, so a model needs nothing beyond the protocol.
    """
    assert isinstance(model, AnytimeNet), f"{type(model).__name__} is not an AnytimeNet"
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    names = {m: f"{type(model).__name__}.{n}" if n else type(model).__name__
             for n, m in model.named_modules()}
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: ran.add(m)) for m in model.modules()]
    costs: list[ExitCost] = []
    earlier_heads = 0
    try:
        with torch.no_grad():
            for k in range(1, model.num_exits + 1):
                counter = FlopCounterMode(display=False)
                with counter:
                    model(x, until=k)
                macs = counter.get_total_flops() // 2
                head = counter.get_flop_counts().get(names[model.exits[k - 1]], {})
                params = sum(p.numel() for m in ran for p in m.parameters(recurse=False))
                position = model.exit_positions[k - 1]
                costs.append(ExitCost(k, position, macs, macs - earlier_heads, params))
                earlier_heads += sum(head.values()) // 2
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return costs
