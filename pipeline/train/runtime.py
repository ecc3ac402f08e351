"""What training, evaluation and the EANN assembly share to set up a job: the device, mixed
precision, joining the process group (ranks other than 0 then log warnings and errors only),
and the anytime model a config names.

    job = start_job(cfg.train.device, cfg.train.amp)    # then job.device, job.dist, job.autocast
    model = create_anytime_model(cfg, num_classes).to(job.device)
"""

from __future__ import annotations

import difflib
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import timm
import torch

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.models import pretrained_cfg  # importing it registers the models with timm
from pipeline.train.distributed import DistInfo, init_distributed, local_rank


@dataclass(frozen=True)
class Job:
    device: torch.device
    dist: DistInfo
    autocast: AbstractContextManager  # reusable, one `with` at a time: around each forward


def start_job(device: str, amp: str) -> Job:
    """Pick the device, join the process group when the launcher started several processes,
    and quiet ranks other than 0 (one voice per job: they report only problems)."""
    torch_device = pick_device(device)
    autocast = amp_context(torch_device, amp)  # before joining: a bad value fails alone
    dist_info = init_distributed(torch_device)
    if not dist_info.is_main:
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    return Job(torch_device, dist_info, autocast)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=auto "
                        "or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        # Training batches keep one shape, so cuDNN's one-off timing of its algorithms pays back.
        torch.backends.cudnn.benchmark = True
        # Modulo: a launcher that binds one GPU per task (--gpus-per-task) leaves one visible.
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        # The current device is what the loaders (DALI, synthetic) and the collectives on
        # Python objects use.
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def amp_context(device: torch.device, amp: str) -> AbstractContextManager:
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA GPU; use train.amp=bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def create_anytime_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """`timm.create_model` of cfg.model, with one line for a name that is not registered (and
    the near ones) or keyword arguments the model refuses."""
    if not timm.is_model(cfg.model.name):
        anytime = timm.list_models("*_ann*") + timm.list_models("*_opt") + \
            timm.list_models("msdnet*")
        near = difflib.get_close_matches(cfg.model.name, anytime, n=3, cutoff=0.5)
        hint = (f"did you mean {' or '.join(near)}?" if near
                else f"anytime models: {', '.join(anytime)}")
        raise UserError(f"model.name={cfg.model.name!r} is not a registered model; {hint}")
    if pretrained_cfg(cfg.model.name) is None:  # registered, but "arch.tag" with a tag timm lacks
        arch, _, tag = cfg.model.name.partition(".")
        raise UserError(f"model.name={cfg.model.name!r}: timm knows no pretrained tag {tag!r} "
                        f"for {arch} (the part after the dot names a set of weights); use "
                        f"model.name={arch}")
    if "output_exit" in cfg.model.kwargs:  # the single-tensor view, for timm's own tools
        raise UserError("model.kwargs.output_exit makes the model give one exit's logits; "
                        "training and evaluation need every exit: remove it (use `until` or "
                        "`--until` for an earlier exit)")
    try:
        return timm.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    except (TypeError, ValueError) as e:  # bad kwargs, or values the model rejects
        raise UserError(f"model.kwargs {cfg.model.kwargs} do not fit {cfg.model.name}: {e}") from e


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
