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
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import build_loader
from pipeline.data.badimages import apply_file_lists
from pipeline.data.listing import index_split

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
    started, cpu, seen = time.perf_counter(), cpu_seconds(), 0
    for batch, _ in itertools.islice(it, batches):
        images = batch
        seen += images.shape[0]
    synchronize(images)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"backend": cfg.backend, "images_per_s": seen / seconds, "images": seen,
            "seconds": seconds, "cpu_ms_per_image": 1e3 * cpu / seen,
            "device": str(images.device), "batch_size": cfg.batch_size, "workers": cfg.workers}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live child processes (DataLoader and
    pool workers), from /proc. Unlike wall time it barely changes when other jobs share the
    cores, so it compares back ends fairly on a busy machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid(), *child_pids(os.getpid())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended in between
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def child_pids(pid: int) -> list[int]:
    """The live descendants of process `pid` (DataLoader and pool workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, task.read_text().split()):
            found += [child, *child_pids(child)]
    return found


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
        started, cpu = time.perf_counter(), cpu_seconds()
        done = sum(pool.map(_decode, chunks))
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"backend": "decode-only limit", "images_per_s": done / seconds, "images": done,
            "seconds": seconds, "cpu_ms_per_image": 1e3 * cpu / done, "device": "cpu",
            "workers": processes}
