"""One job's set-up and teardown, entered the same way by training, evaluation and the EANN
assembly: the device, mixed precision, the process group, one voice per job.

    with open_job(cfg.train.device, cfg.train.amp) as job:   # job.device, job.dist, job.autocast
        model = model.to(job.device)
        with job.autocast:
            logits = model(x)

On leaving, however the job ends (a UserError, a divergence, a preemption), the process group
is closed and the log level of ranks other than 0 restored: a job that raised leaves no group
behind for the next one in the same process (tests, notebooks, a Ray worker's next attempt).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from pipeline.distributed import DistInfo, close_distributed, init_distributed, local_rank
from pipeline.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
AMPS = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class Job:
    device: torch.device
    dist: DistInfo
    autocast: AbstractContextManager  # reusable, one `with` at a time: around each forward


@contextmanager
def open_job(device: str, amp: str) -> Iterator[Job]:
    """Pick the device, join the process group when the launcher started several processes,
    and quiet ranks other than 0 (they report only problems); undo it all on the way out."""
    torch_device = pick_device(device)
    autocast = amp_context(torch_device, amp)  # before joining: a bad value fails alone
    logger = logging.getLogger("pipeline")
    level = logger.level
    try:
        dist_info = init_distributed(torch_device)
        if not dist_info.is_main:
            logger.setLevel(logging.WARNING)
        yield Job(torch_device, dist_info, autocast)
    finally:
        close_distributed()
        logger.setLevel(level)


def pick_device(requested: str) -> torch.device:
    if requested not in DEVICES:
        raise UserError(f"device={requested!r} is not one of {', '.join(DEVICES)}")
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
    if amp not in AMPS:  # else anything but bf16 would silently mean fp16
        raise UserError(f"amp={amp!r} is not one of {', '.join(AMPS)}")
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA GPU; use train.amp=bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
