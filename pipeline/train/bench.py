"""`python -m pipeline bench train`: images/s of the full training step against the bare step.

Full step: the config's real loader (decode, augment, collate), the copy to the device, forward,
anytime loss, backward, optimizer step. Bare step: the same model, loss and optimizer on one
batch of synthetic tensors already on the device. Both run in one process, one after the other,
so their ratio says what the input pipeline costs on this machine. The model's training FLOPs
turn both rates into TFLOP/s and, against the device's peak, a model-FLOPs utilisation (MFU);
`profile_dir` adds a torch.profiler trace that splits a step into loader wait, host and kernels.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.anytime.loss import AnytimeLoss
from pipeline.config import Config
from pipeline.data import build_loader
from pipeline.job import amp_context, pick_device
from pipeline.models import create_anytime_model
from pipeline.train.step import TrainStep
from pipeline.train.trainer import build_optimizer

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets;
# the first name found in torch.cuda.get_device_name() wins, so variants come before families.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def bench_train(cfg: Config, steps: int = 30, warmup: int = 5, peak_tflops: float | None = None,
                profile_dir: Path | None = None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.train.device)
    loader = build_loader(cfg.data, "train", train=True, seed=cfg.seed)
    if len(loader) < warmup + steps:
        steps = max(1, len(loader) - warmup)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    num_classes = cfg.model.num_classes or len(loader.classes)
    model = create_anytime_model(cfg.model.name, num_classes, **cfg.model.kwargs)
    model = model.to(device, memory_format=memory_format).train()
    size = cfg.data.image_size
    flops_per_image = train_flops_per_image(model, (3, size, size))
    criterion = AnytimeLoss(model.num_exits, cfg.loss, seed=cfg.seed).to(device).train()
    optimizer = build_optimizer(cfg.optim, model, global_batch=cfg.data.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    autocast = amp_context(device, cfg.train.amp)

    train_step = TrainStep(model, criterion, optimizer, scaler, autocast, device,
                           memory_format=memory_format, grad_clip=cfg.optim.grad_clip,
                           compile=cfg.train.compile, compile_mode=cfg.train.compile_mode,
                           compile_backend=cfg.train.compile_backend)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_step([(images, labels)])

    loader.set_epoch(0)
    full, loader_wait = timed(step, loader, steps, warmup, device)
    images = torch.randn(cfg.data.batch_size, 3, size, size, device=device)
    images = images.to(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (cfg.data.batch_size,), device=device)
    synthetic = itertools.repeat((images, labels))
    bare, _ = timed(step, synthetic, steps, warmup, device)

    if peak_tflops is None and cfg.train.amp in ("bf16", "fp16"):
        peak_tflops = device_peak_tflops(device)
    result = {"model": cfg.model.name, "device": str(device), "device_name": device_name(device),
              "amp": cfg.train.amp, "batch_size": cfg.data.batch_size, "steps": steps,
              "full_images_per_s": full, "bare_images_per_s": bare, "ratio": full / bare,
              "loader_wait_fraction": loader_wait, "train_gflops_per_image": flops_per_image / 1e9,
              "full_tflops": full * flops_per_image / 1e12,
              "bare_tflops": bare * flops_per_image / 1e12, "peak_tflops": peak_tflops}
    if peak_tflops:
        result["full_mfu"] = result["full_tflops"] / peak_tflops
        result["bare_mfu"] = result["bare_tflops"] / peak_tflops
    if profile_dir is not None:
        loader.set_epoch(1)
        result["profile"] = profile(step, loader, min(5, len(loader)), device, profile_dir)
    return result


def timed(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Batches, steps: int,
          warmup: int, device: torch.device) -> tuple[float, float]:
    """(images/s, fraction of the time the host waited for the next batch) over `steps` steps
    after `warmup` untimed ones."""
    batches = iter(batches)
    for images, labels in itertools.islice(batches, warmup):
        step(images, labels)
    synchronize(device)
    started, waited, images_seen = time.perf_counter(), 0.0, 0
    for _ in range(steps):
        asked = time.perf_counter()
        images, labels = next(batches)
        waited += time.perf_counter() - asked
        step(images, labels)
        images_seen += images.shape[0]
    synchronize(device)
    seconds = time.perf_counter() - started
    return images_seen / seconds, waited / seconds


def train_flops_per_image(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    """Forward + backward FLOPs of one training image through every exit (convolutions and
    matmuls, counted by torch's FLOP counter on a batch of two)."""
    param = next(model.parameters())
    x = torch.randn(2, *input_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        sum(logits.float().sum() for logits in model(x)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU; None elsewhere (pass --peak-tflops)."""
    name = device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def profile(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Batches, steps: int,
            device: torch.device, out_dir: Path) -> dict[str, Any]:
    """Profile `steps` full steps; write a Chrome trace and the op table to `out_dir`; return
    per-step milliseconds of loader wait, host time in the step and kernel time on the device."""
    from torch.profiler import ProfilerActivity, record_function

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    batches: Iterator = iter(batches)
    step(*next(batches))  # the profiler's first step pays one-off set-up costs
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            with record_function("loader_wait"):
                images, labels = next(batches)
            with record_function("train_step"):
                step(images, labels)
        synchronize(device)
        wall = time.perf_counter() - started
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    events = prof.key_averages()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out_dir / "ops.txt").write_text(events.table(sort_by=sort_by, row_limit=30))
    host_us = {e.key: e.cpu_time_total for e in events if e.key in ("loader_wait", "train_step")}
    kernels_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
    return {"steps": steps, "wall_ms": 1e3 * wall / steps,
            "loader_wait_ms": host_us.get("loader_wait", 0.0) / 1e3 / steps,
            "host_step_ms": host_us.get("train_step", 0.0) / 1e3 / steps,
            "kernel_ms": kernels_us / 1e3 / steps if device.type == "cuda" else None,
            "trace": str(out_dir / "trace.json"), "ops": str(out_dir / "ops.txt")}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
