"""Anytime networks. Importing this package registers every model with timm's registry."""

from pipeline.models import (
    msdnet,  # noqa: F401
    resnet_ann,  # noqa: F401  (registers the models)
)
from pipeline.models.anytime import AnytimeNet, ExitCost, exit_costs, pretrained_cfg
from pipeline.models.create import create_anytime_model, weights_mismatch

__all__ = ["AnytimeNet", "ExitCost", "create_anytime_model", "exit_costs", "pretrained_cfg",
           "weights_mismatch"]
