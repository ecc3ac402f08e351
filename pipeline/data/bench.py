"""`python -m pipeline bench loader`: images/s of a loader back end, and the decode-only limit.

The limit is what the CPU can do at best on these files: a full JPEG decode (libjpeg-turbo, in
Pillow) of every image on all cores, with no resize, crop, normalise or copy into a batch. A
loader's ratio to it says how much of the CPU its own work (augmentation, batching, transfer)
takes. DALI's training decode may beat it: it decodes only the crop window.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time

import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import build_loader
from pipeline.data.folder import index_split
from pipeline.data.verify import apply_file_lists

log = logging.getLogger(__name__)


def bench_loader(cfg: DataConfig, split: str = "train", batches: int = 50,
                 warmup: int = 5) -> dict[str, float]:
    """Images/s of `cfg.backend` over `batches` batches after `warmup` untimed ones (wrapping
    into the next epochs when the split is small)."""
    train = split == "train"
    loader = build_loader(cfg, split, train=train, seed=0)

    def endless():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    it = endless()
    images = torch.empty(0)
    for batch, _ in itertools.islice(it, warmup):
        images = batch
    synchronize(images)
    started, seen = time.perf_counter(), 0
    for batch, _ in itertools.islice(it, batches):
        images = batch
        seen += images.shape[0]
    synchronize(images)
    seconds = time.perf_counter() - started
    return {"backend": cfg.backend, "images_per_s": seen / seconds, "images": seen,
            "seconds": seconds, "device": str(images.device), "batch_size": cfg.batch_size,
            "workers": cfg.workers}


def synchronize(images: torch.Tensor) -> None:
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)


def _decode(paths: list[str]) -> int:
    done = 0
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()  # the full decode, in im's own mode (RGB for colour JPEGs)
            done += 1
        except Exception:  # a bad image costs its time but is not counted
            pass
    return done


def decode_limit(root: str, split: str = "train", images: int = 2000,
                 processes: int | None = None) -> dict[str, float]:
    """Images/s of the full decode alone on `processes` (all cores) processes."""
    index = apply_file_lists(index_split(root, split))
    paths = [str(index.path(i)) for i in range(min(images, len(index)))]
    processes = processes or os.cpu_count() or 1
    chunks = [paths[i : i + 32] for i in range(0, len(paths), 32)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_decode, chunks[:processes])  # warm: workers started, files in the page cache
        started = time.perf_counter()
        done = sum(pool.map(_decode, chunks))
        seconds = time.perf_counter() - started
    return {"backend": "decode-only limit", "images_per_s": done / seconds, "images": done,
            "seconds": seconds, "device": "cpu", "workers": processes}
