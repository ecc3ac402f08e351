"""Anytime networks. Importing this package registers every model with timm's registry."""

from pipeline.models import (
    msdnet,  # noqa: F401
    resnet_ann,  # noqa: F401  (registers the models)
)
from pipeline.models.anytime import AnytimeNet, ExitCost, exit_costs, pretrained_cfg

__all__ = ["AnytimeNet", "ExitCost", "exit_costs", "pretrained_cfg"]
