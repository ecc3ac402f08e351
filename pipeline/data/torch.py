"""The torch fallback loader: PIL decode + torchvision transforms + DataLoader, with a sampler that
resumes mid-epoch and a bad-file policy.

    loader = build_loader(cfg.data, "train", train=True, rank=rank, world_size=world, seed=cfg.seed)
    loader.set_epoch(epoch, start_batch)  # start_batch > 0 only right after a resume
    for images, labels in loader: ...
    state = loader.state_dict()           # {"epoch", "batch", ...}: plain ints for the checkpoint

An image that fails to decode is dropped from its batch (so a batch may be a little smaller), named
once in the log, and counted; the run fails with a UserError once too many images were bad.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.folder import FolderIndex
from pipeline.data.verify import BadImageCounter
from pipeline.errors import UserError

log = logging.getLogger(__name__)


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


def mix_seed(*parts: int) -> int:
    """One 64-bit generator seed per tuple of ints (run seed, epoch, sample, ...).

    Not seed + n as in DistributedSampler: there seed 1 epoch 0 repeats seed 0 epoch 1, so
    separately seeded ensemble members would share data orders.
    """
    h = 0
    for p in parts:
        h = (h * 0x9E3779B97F4A7C15 + p + 1) % 2**64
    return h


class BadImage(NamedTuple):
    """What the dataset returns in place of an image that would not decode."""

    path: str
    error: str


class FolderDataset(Dataset):
    def __init__(self, index: FolderIndex,
                 transform: Callable[[Image.Image, int], torch.Tensor]):
        self.index = index
        self.split_dir = str(index.split_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int] | BadImage:
        i, sample_seed = item
        path, label = self.index.samples[i]
        path = f"{self.split_dir}/{path}"
        try:
            # load() forces the full decode here, so truncated files fail now (PIL's
            # LOAD_TRUNCATED_IMAGES stays off on purpose). PIL raises many exception types
            # (OSError, SyntaxError, ValueError, DecompressionBombError), so catch them all, but
            # only around the decode.
            with Image.open(path) as image:
                image.load()
        except Exception as e:
            return BadImage(path, f"{type(e).__name__}: {e}")
        return self.transform(image, sample_seed), label


class CollateSkipBad:
    """Stacks the good samples of a batch into normalised float32 images; passes the bad ones on."""

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor]):
        self.normalize = normalize

    def __call__(
        self, samples: list[tuple[torch.Tensor, int] | BadImage],
    ) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
        good = [s for s in samples if not isinstance(s, BadImage)]
        bad = [s for s in samples if isinstance(s, BadImage)]
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        images, labels = default_collate(good)
        return self.normalize(images), labels, bad


class ResumableSampler(Sampler[int]):
    """DistributedSampler's sharding with a mid-epoch start.

    Epoch e's order is a permutation seeded by (seed, epoch), padded by wrapping to a multiple of
    world_size (with `pad`, so every rank runs the same number of steps); rank r takes every
    world_size-th index from position r. Without `pad` (evaluation) ranks may differ by one
    sample and every sample is seen exactly once. `set_epoch(e, start)` skips this rank's first
    `start` indices, so a resumed epoch yields exactly what was left.
    """

    def __init__(
        self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
        world_size: int = 1, pad: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.per_rank = (math.ceil(num_samples / world_size) if pad
                         else len(range(rank, num_samples, world_size)))
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start={start} is outside this rank's {self.per_rank} samples")
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        """This rank's whole order for the current epoch, including the part already consumed."""
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if not self.pad:
            return order[self.rank :: self.world_size]
        total = self.per_rank * self.world_size
        if total > n:  # wrap, repeatedly if there are fewer samples than ranks
            order += (order * math.ceil((total - n) / max(n, 1)))[: total - n]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The ranks' first `start` indices together are exactly the order's first
        # start * world_size positions, so a resume on another world size can restart near there
        # (repeating fewer than world_size samples, skipping none).
        consumed = state["start"] * state.get("world_size", self.world_size)
        self.set_epoch(state["epoch"], min(consumed // self.world_size, self.per_rank))


class _SeededSampler:
    """Tags each index with a seed of its own for the augmentation: (index, seed(run, epoch, i))."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        return ((i, mix_seed(s.seed, s.epoch, i)) for i in s)

    def __len__(self) -> int:
        return len(self.sampler)


class TorchLoader:
    """Batches (float32 NCHW images, int64 labels) of one split for one rank, resumable."""

    def __init__(
        self,
        cfg: DataConfig,
        index: FolderIndex,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        check_data_config(cfg)
        self.classes = index.classes
        self.num_samples = len(index)
        self.batch_size = cfg.batch_size
        self.world_size = world_size
        self.drop_last = train
        self.sampler = ResumableSampler(
            len(index), shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=train
        )
        self.dataset = FolderDataset(index, build_transform(cfg, train))
        if len(self) == 0:
            raise UserError(
                f"{index.split_dir} gives each of {world_size} processes "
                f"{self.sampler.per_rank} images, fewer than one batch of data.batch_size="
                f"{cfg.batch_size}; lower data.batch_size or use fewer processes"
            )
        # DataLoader draws its workers' base seed from this generator rather than the global RNG,
        # so iterating leaves the trainer's RNG stream alone.
        generator = torch.Generator().manual_seed(mix_seed(seed, rank))
        self._loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=_SeededSampler(self.sampler),
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=self.drop_last,
            collate_fn=CollateSkipBad(batch_normalize(cfg)),
            generator=generator,
        )
        self.epoch = 0
        self.batch = 0  # batches of self.epoch handed out so far
        per_epoch = len(self) * self.batch_size if self.drop_last else self.sampler.per_rank
        self.counter = BadImageCounter(cfg.max_bad_fraction, per_epoch)

    def __len__(self) -> int:
        n, bs = self.sampler.per_rank, self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(self)} batches")
        self.epoch = epoch
        self.batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch, min(self.batch * self.batch_size, self.sampler.per_rank))
        for images, labels, bad in self._loader:
            # Count before yielding: while the caller holds batch k, state_dict() says k batches
            # are consumed, so a checkpoint taken after its step resumes at batch k + 1.
            self.batch += 1
            self.counter.record(len(labels) + len(bad), bad)  # BadImage = (path, error)
            if len(labels):
                yield images, labels

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        per_step = self.batch_size * self.world_size
        saved = state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size)
        batch = state["batch"]
        if saved != per_step:
            # Another batch size or world size: restart at the batch that holds the first image
            # not yet consumed (a few images are seen twice, none skipped).
            batch = state["batch"] * saved // per_step
            log.warning(
                "resuming with %d images per step instead of %d: epoch %d restarts at batch %d",
                per_step, saved, state["epoch"], batch,
            )  # fmt: skip
        self.set_epoch(state["epoch"], min(batch, len(self)))

    @property
    def bad_files(self) -> list[str]:
        return self.counter.bad_files

    @property
    def seen(self) -> int:
        return self.counter.seen


def check_data_config(cfg: DataConfig) -> None:
    problems = {
        "image_size": cfg.image_size > 0,
        "batch_size": cfg.batch_size > 0,
        "workers": cfg.workers >= 0,
        "max_bad_fraction": 0.0 <= cfg.max_bad_fraction <= 1.0,
        "val_resize_ratio": 0.0 < cfg.val_resize_ratio <= 1.0,
        "crop_scale": 0.0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1.0,
        "crop_ratio": 0.0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1],
        "std": all(s > 0 for s in cfg.std),
    }
    hints = {
        "image_size": "a positive size such as 224",
        "batch_size": "a positive count such as 256",
        "workers": "0 (load in the main process) or more",
        "max_bad_fraction": "between 0 and 1, e.g. 0.01",
        "val_resize_ratio": "in (0, 1], e.g. 0.875",
        "crop_scale": "two increasing fractions in (0, 1], e.g. [0.08, 1.0]",
        "crop_ratio": "two increasing positive ratios, e.g. [0.75, 1.333]",
        "std": "positive, e.g. [0.229, 0.224, 0.225]",
    }
    for key, ok in problems.items():
        if not ok:
            raise UserError(f"data.{key}={getattr(cfg, key)!r} is invalid; use {hints[key]}")
