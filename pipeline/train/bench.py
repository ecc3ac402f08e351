"""`python -m pipeline bench train`: images/s of the full training step against the bare step.

Full step: the config's real loader (decode, augment, collate), the copy to the device, forward,
anytime loss, backward, optimizer step. Bare step: the same model, loss and optimizer on one
batch of synthetic tensors already on the device. Both run in one process, one after the other,
so their ratio says what the input pipeline costs on this machine.
"""

from __future__ import annotations

import itertools
import time

import torch

from pipeline.config import Config
from pipeline.data import build_loader
from pipeline.train.trainer import (
    amp_context,
    build_loss,
    build_optimizer,
    create_anytime_model,
    pick_device,
    train_step,
)


def bench_train(cfg: Config, steps: int = 30, warmup: int = 5) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.train.device)
    loader = build_loader(cfg.data, "train", train=True, seed=cfg.seed)
    if len(loader) < warmup + steps:
        steps = max(1, len(loader) - warmup)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    num_classes = cfg.model.num_classes or len(loader.classes)
    model = create_anytime_model(cfg, num_classes)
    model = model.to(device, memory_format=memory_format).train()
    criterion = build_loss(cfg, model.num_exits).to(device).train()
    optimizer = build_optimizer(cfg, model, world_size=1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    autocast = amp_context(device, cfg.train.amp)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(model, criterion, optimizer, scaler, autocast, images, labels,
                          cfg.optim.grad_clip)[0]

    def timed(batches) -> float:
        """Images/s over `steps` steps after `warmup` untimed ones."""
        batches = iter(batches)
        for images, labels in itertools.islice(batches, warmup):
            step(images.to(device, memory_format=memory_format), labels.to(device))
        synchronize(device)
        started, images_seen = time.perf_counter(), 0
        for images, labels in itertools.islice(batches, steps):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            step(images, labels.to(device, non_blocking=True))
            images_seen += images.shape[0]
        synchronize(device)
        return images_seen / (time.perf_counter() - started)

    loader.set_epoch(0)
    full = timed(loader)
    size = cfg.data.image_size
    images = torch.randn(cfg.data.batch_size, 3, size, size, device=device)
    images = images.to(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (cfg.data.batch_size,), device=device)
    bare = timed(itertools.repeat((images, labels)))
    return {"full_images_per_s": full, "bare_images_per_s": bare, "ratio": full / bare,
            "steps": steps, "batch_size": cfg.data.batch_size, "device": str(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
