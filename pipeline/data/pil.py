"""The `torch` back end: PIL decode + torchvision transforms + a torch DataLoader (its workers
decode). Runs anywhere; reads image folders on local disk, and tar shards on local disk or in
object storage (pipeline/data/shard_reader.py).

Crops and flips are drawn from each sample's own seed (run seed, epoch, sample), so a resumed
run repeats the exact augmentation of an uninterrupted one, whatever the worker count. An image
that fails to decode is dropped from its batch (which is then smaller) and counted
(pipeline/data/badimages.py).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.index import SampleIndex
from pipeline.data.loader import Loader, RawBatch
from pipeline.data.sampler import mix_seed
from pipeline.data.shard_reader import BadSample, ShardReader, shard_blocks, start_prefetch
from pipeline.data.shards import ShardIndex
from pipeline.errors import UserError
from pipeline.storage.retry import StorageError


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Image.Image, int], torch.Tensor]:
    """(decoded PIL image, the sample's seed) -> uint8 CHW tensor with the split's geometry and
    flips. Scaling to float and normalising happen once per batch (`batch_normalize`)."""
    size = cfg.image_size
    if cfg.augment == "small":
        return SmallImages(size, flip=train)
    if train:
        crop = v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
        geometry = [crop, v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(size / cfg.val_resize_ratio)), v2.CenterCrop(size)]
    return SeededTransform(v2.Compose([*geometry, v2.PILToTensor()]))


class SeededTransform:
    """A torchvision transform on RGB whose random draws come from the sample's own seed, so a
    resumed run repeats the exact crops and flips of an uninterrupted one whatever the worker
    count. The caller's RNG state is put back (it is the trainer's own with workers=0).
    (torch.manual_seed and fork_rng cost ~120 us here, the CPU generator's own methods ~2 us.)"""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: Image.Image, sample_seed: int) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed(sample_seed)
        try:
            return self.transform(image)
        finally:
            rng.set_state(state)


class SmallImages:
    """The "small" augmentation, for images already at image_size (CIFAR, Fashion-MNIST): straight
    to a tensor, resized and centre-cropped only when an image is not square at image_size (so
    batches stay square), flipped by the sample's seed when training. A grayscale image stays one
    plane until the batch is stacked. torchvision's v2 pipeline, or saving and restoring the global
    generator around each image, costs more than the decode of such tiny images."""

    def __init__(self, size: int, flip: bool):
        self.size = size
        self.flip = flip
        self.fit = v2.Compose([v2.Resize(size), v2.CenterCrop(size)])
        self.generator = torch.Generator()

    def __call__(self, image: Image.Image, sample_seed: int) -> torch.Tensor:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = self.fit(image)
        width, height = image.size
        channels = len(image.getbands())
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        chw = pixels.view(height, width, channels).permute(2, 0, 1)
        # The draw v2.RandomHorizontalFlip would make from the sample's seed, from a generator of
        # our own (the global one would need saving and restoring around it).
        if self.flip and torch.rand(1, generator=self.generator.manual_seed(sample_seed)) < 0.5:
            chw = chw.flip(-1)
        return chw.expand(3, height, width)  # collate copies it into the batch either way


def batch_normalize(cfg: DataConfig) -> v2.Compose:
    """A batch of uint8 images -> float32 in [0, 1], minus mean, over std (in place)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(cfg.mean), list(cfg.std), inplace=True)])


class BadImage(NamedTuple):
    """What the dataset returns in place of an image that would not decode."""

    path: str
    error: str


class Unreadable(NamedTuple):
    """What the dataset returns when the storage failed past its retries: it travels in its
    batch to the main process, which raises it as one line (an exception raised in a worker
    would come wrapped in the worker's traceback)."""

    error: str


class FolderDataset(Dataset):
    """(sample index, sample seed) -> (uint8 CHW image, label, index), or a BadImage."""

    def __init__(self, index: SampleIndex,
                 transform: Callable[[Image.Image, int], torch.Tensor]):
        self.index = index
        self.split_dir = str(index.split_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int] | BadImage:
        i, sample_seed = item
        path = f"{self.split_dir}/{self.index.relpath(i)}"
        try:
            # load() forces the full decode here, so truncated files fail now (PIL's
            # LOAD_TRUNCATED_IMAGES stays off on purpose). PIL raises many exception types
            # (OSError, SyntaxError, ValueError, DecompressionBombError), so catch them all, but
            # only around the decode.
            with Image.open(path) as image:
                image.load()
        except Exception as e:
            return BadImage(path, f"{type(e).__name__}: {e}")
        return self.transform(image, sample_seed), self.index.label(i), i


class ShardDataset(Dataset):
    """(sample index, sample seed) -> (uint8 CHW image, label, index), a BadImage, or
    Unreadable: the images of tar shards."""

    def __init__(self, reader: ShardReader,
                 transform: Callable[[Image.Image, int], torch.Tensor]):
        self.reader = reader
        self.labels = reader.index.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int] | BadImage \
            | Unreadable:
        i, sample_seed = item
        try:
            data = self.reader.read(i)
        except BadSample as e:
            return BadImage(self.reader.name(i), str(e))
        except UserError as e:  # StorageError: the store failed past its retries
            return Unreadable(str(e))
        except OSError as e:  # a shard deleted or unreadable mid-run, the cache's disk full
            return Unreadable(f"reading {self.reader.shard_name(i)} failed ({type(e).__name__}: "
                              f"{e}); check the data and data.cache_dir")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # as FolderDataset: the whole decode, here
        except Exception as e:
            return BadImage(self.reader.name(i), f"{type(e).__name__}: {e}")
        return self.transform(image, sample_seed), int(self.labels[i]), i


class CollateSkipBad:
    """Stacks the good samples of a batch into normalised float32 images; passes the bad ones on."""

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor]):
        self.normalize = normalize

    def __call__(self, samples: list[tuple[torch.Tensor, int, int] | BadImage | Unreadable]
                 ) -> RawBatch:
        good = [s for s in samples if not isinstance(s, (BadImage, Unreadable))]
        bad = [s if isinstance(s, Unreadable) else tuple(s) for s in samples
               if isinstance(s, (BadImage, Unreadable))]
        if not good:
            empty = torch.empty(0, dtype=torch.int64)
            return torch.empty(0), empty, empty, bad
        images, labels, indices = default_collate(good)
        return self.normalize(images), labels, indices, bad


class SeededOrder:
    """The DataLoader's sampler: the indices `PilLoader._load` was given, each with a seed of its
    own for the augmentation: (index, seed(run, epoch, index))."""

    def __init__(self) -> None:
        self.indices = np.empty(0, dtype=np.int64)
        self.seed = self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, mix_seed(self.seed, self.epoch, i)) for i in self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


class PilLoader(Loader):
    """Batches (float32 NCHW images, int64 labels) of local image files or of tar shards,
    decoded by PIL in the DataLoader's workers."""

    def __init__(self, cfg: DataConfig, index: SampleIndex | ShardIndex, *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, accumulation: int = 1):
        shards = isinstance(index, ShardIndex)
        super().__init__(cfg, index.classes, len(index), source=str(index.split_dir),
                         train=train, rank=rank, world_size=world_size, seed=seed,
                         accumulation=accumulation,
                         blocks=shard_blocks(cfg, index, train=train, world_size=world_size)
                         if shards else None)
        self.cfg = cfg
        self.reader = ShardReader(index, self.sampler.blocks.bounds, cache_dir=cfg.cache_dir
                                  ) if shards else None
        transform = build_transform(cfg, train)
        self.dataset = ShardDataset(self.reader, transform) if self.reader else \
            FolderDataset(index, transform)
        self._order = SeededOrder()
        # DataLoader draws its workers' base seed from this generator rather than the global RNG,
        # so iterating leaves the trainer's RNG stream alone.
        generator = torch.Generator().manual_seed(mix_seed(seed, rank))
        self._loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self._order,  # read afresh at each epoch, also by persistent workers
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=CollateSkipBad(batch_normalize(cfg)),
            generator=generator,
        )

    def _load(self, indices: np.ndarray) -> Iterator[RawBatch]:
        self._order.indices, self._order.seed, self._order.epoch = indices, self.seed, self.epoch
        batches = iter(self._loader)  # forks the workers (first epoch) before any thread starts
        # what the workers may have read ahead of the batches handed out
        in_flight = self.batch_size * (2 * self.cfg.workers + 1)
        prefetcher = start_prefetch(self.cfg, self.reader, indices, in_flight) \
            if self.reader else None
        try:
            handed_out = 0
            for batch in batches:
                failed = next((b for b in batch[3] if isinstance(b, Unreadable)), None)
                if failed:
                    raise StorageError(failed.error)
                yield batch
                handed_out += self.batch_size
                if prefetcher:
                    prefetcher.advance(handed_out)
        finally:
            if prefetcher:
                prefetcher.close()
