"""The `synthetic` back end: random tensors made once on the device and handed out again every
step, so a benchmark measures the model and not the input pipeline.

Epochs have the length of `data.root`'s split when that folder exists (the same steps as a real
run), else ImageNet-1k's (1,281,167 training and 50,000 validation images, 1,000 classes). The
position, the sharding and the sample indices are those of a real loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.index import SampleIndex
from pipeline.data.loader import Loader, RawBatch
from pipeline.data.shards import ShardIndex

log = logging.getLogger(__name__)

IMAGENET_SPLITS = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000


class SyntheticLoader(Loader):
    def __init__(self, cfg: DataConfig, index: SampleIndex | ShardIndex | str, *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, accumulation: int = 1):
        """`index`: the split's index, or the split's name where there is no data."""
        if not isinstance(index, str):  # a SampleIndex or a ShardIndex
            classes, num_samples, source = index.classes, len(index), str(index.split_dir)
        else:
            classes = [f"class_{i:04d}" for i in range(IMAGENET_CLASSES)]
            num_samples = IMAGENET_SPLITS.get(index, IMAGENET_SPLITS["val"])
            source = f"ImageNet-1k's {index} split"
            log.info("synthetic data: %s has no data, so epochs have ImageNet-1k's %d %s images",
                     cfg.root, num_samples, index)
        super().__init__(cfg, classes, num_samples, source=source, train=train, rank=rank,
                         world_size=world_size, seed=seed, accumulation=accumulation)
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

    def _load(self, indices: np.ndarray) -> Iterator[RawBatch]:
        for start in range(0, len(indices), self.batch_size):
            ids = torch.from_numpy(indices[start : start + self.batch_size])
            yield self.images[: len(ids)], self.labels[: len(ids)], ids, []
