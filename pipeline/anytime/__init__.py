"""Anytime (early-exit) training losses and their weight schemes."""

from typing import Any

from pipeline.anytime.weights import SCHEMES, static_weights

__all__ = ["SCHEMES", "AnytimeLoss", "static_weights"]


def __getattr__(name: str) -> Any:
    # Lazy, so that reading the weight schemes (configs, reports) does not import torch.
    if name == "AnytimeLoss":
        from pipeline.anytime.loss import AnytimeLoss

        return AnytimeLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
