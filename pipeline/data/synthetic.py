"""Synthetic batches for throughput measurements: random tensors made once on the device and
handed out again every step, so a benchmark measures the model and not the input pipeline.

The same interface as the other loaders. Epochs have the length of `data.root`'s split when that
folder exists (the same steps as a real run), else ImageNet-1k's (1,281,167 training and 50,000
validation images, 1,000 classes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.config import DataConfig
from pipeline.data.folder import index_split
from pipeline.data.torch import TorchLoader, check_data_config

log = logging.getLogger(__name__)

IMAGENET_SPLITS = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                 world_size: int = 1):
        check_data_config(cfg)
        if Path(cfg.root).is_dir():
            index = index_split(cfg.root, split)
            self.classes, self.num_samples = index.classes, len(index)
        else:
            self.classes = [f"class_{i:04d}" for i in range(IMAGENET_CLASSES)]
            self.num_samples = IMAGENET_SPLITS.get(split, IMAGENET_SPLITS["val"])
            log.info("synthetic data: %s has no data, so epochs have ImageNet-1k's %d %s images",
                     cfg.root, self.num_samples, split)
        self.batch_size = cfg.batch_size
        self.world_size = world_size
        self.drop_last = train
        self.per_rank = math.ceil(self.num_samples / world_size)
        if train:  # as the real loaders: train shards are padded, val shards are not
            self.per_rank_epoch = self.per_rank
        else:
            self.per_rank_epoch = len(range(rank, self.num_samples, world_size))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())  # set by the trainer
        else:
            self.device = torch.device("cpu")
        dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
        g = torch.Generator(device=self.device).manual_seed(rank)
        size = cfg.image_size
        shape = (cfg.batch_size, size, size, 3) if cfg.channels_last else \
            (cfg.batch_size, 3, size, size)
        images = torch.randn(shape, generator=g, device=self.device, dtype=dtype)
        self.images = images.permute(0, 3, 1, 2) if cfg.channels_last else images
        self.labels = torch.randint(0, len(self.classes), (cfg.batch_size,), generator=g,
                                    device=self.device)
        self.epoch = 0
        self.batch = 0
        self.bad_files: list[str] = []
        self.seen = 0

    def __len__(self) -> int:
        n, bs = self.per_rank_epoch, self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    set_epoch = TorchLoader.set_epoch
    state_dict = TorchLoader.state_dict
    load_state_dict = TorchLoader.load_state_dict

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.batch < len(self):
            n = min(self.batch_size, self.per_rank_epoch - self.batch * self.batch_size)
            self.batch += 1
            self.seen += n
            yield self.images[:n], self.labels[:n]
