"""The anytime model a config names, with one-line errors for names and keyword arguments that
do not fit, and the check that a saved model state fits a model before loading it.

    model = create_anytime_model(cfg.model.name, num_classes, **cfg.model.kwargs)
    mismatch = weights_mismatch(model, state["model"])  # None, or the first difference
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch

from pipeline.errors import UserError
from pipeline.models.anytime import pretrained_cfg


def create_anytime_model(name: str, num_classes: int, **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model` of model.name with model.kwargs, with one line for a name that is
    not registered (and the near ones) or keyword arguments the model refuses."""
    if not timm.is_model(name):
        anytime = timm.list_models("*_ann*") + timm.list_models("*_opt") + \
            timm.list_models("msdnet*")
        near = difflib.get_close_matches(name, anytime, n=3, cutoff=0.5)
        hint = (f"did you mean {' or '.join(near)}?" if near
                else f"anytime models: {', '.join(anytime)}")
        raise UserError(f"model.name={name!r} is not a registered model; {hint}")
    if pretrained_cfg(name) is None:  # registered, but "arch.tag" with a tag timm lacks
        arch, _, tag = name.partition(".")
        raise UserError(f"model.name={name!r}: timm knows no pretrained tag {tag!r} "
                        f"for {arch} (the part after the dot names a set of weights); use "
                        f"model.name={arch}")
    if "output_exit" in kwargs:  # the single-tensor view, for timm's own tools
        raise UserError("model.kwargs.output_exit makes the model give one exit's logits; "
                        "training and evaluation need every exit: remove it (use `until` or "
                        "`--until` for an earlier exit)")
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:  # bad kwargs, or values the model rejects
        raise UserError(f"model.kwargs {kwargs} do not fit {name}: {e}") from e


def weights_mismatch(model: torch.nn.Module, saved: Any) -> str | None:
    """How a checkpoint's model state does not fit `model` (its first difference), or None.
    Asked before `load_state_dict`, whose error is a many-line traceback that begins with no
    more than the model's class name."""
    if not isinstance(saved, dict):
        return f"its model state is a {type(saved).__name__}, not a state dict"
    own = model.state_dict()
    for key, value in saved.items():
        if key not in own:
            return f"it holds {key}, which this model has not"
        if isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            return f"{key} is {list(value.shape)} there and {list(own[key].shape)} here"
    missing = [key for key in own if key not in saved]
    if missing:
        return f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:] else "")
    return None
