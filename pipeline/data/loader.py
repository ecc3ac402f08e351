"""What every back end gives the trainer, and the bookkeeping they share: the epoch's position as
checkpoint state, the rank's share of the order, the bad-image count.

    loader = build_loader(cfg.data, "train", train=True, rank=rank, world_size=world, seed=seed)
    loader.set_epoch(epoch)
    loader.load_state_dict(saved)         # after a resume: on any world size or batch size
    for images, labels in loader: ...     # or loader.batches_with_indices(): + sample indices
    saved = loader.state_dict()           # {"epoch", "consumed", "num_samples"}: plain ints

`consumed` counts the samples of the epoch's global order handed out so far over all ranks
(per-rank batch x world size per batch, counted when the batch is handed out), so a loader for
another number of ranks or another per-rank batch continues with exactly the samples not yet
consumed (pipeline/data/sampler.py). A checkpoint that holds no loader state (written before
there was any) gets it from its step: `position_from_step` in pipeline/data/sampler.py.
(Not wired into the trainer yet: it still positions a resumed epoch with
`set_epoch(epoch, start_batch=...)` and refuses another number of ranks; issue 14.)

A back end is one file: a subclass that sets `reads_urls` and implements `_load`, registered by
name in pipeline/data/factory.py.

Epoch ends. Training: every rank gets the same number of samples (the rest of the order padded
by wrapping) and whole batches only, so every rank runs the same number of steps; the samples of
a last partial global batch are left for the next epoch's shuffle. Evaluation: unpadded shards
(each image on exactly one rank) and a smaller last batch, so every image is counted exactly once.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.badimages import BadImageCounter
from pipeline.data.sampler import ResumableSampler
from pipeline.errors import UserError

log = logging.getLogger(__name__)

# A batch as a back end loads it: (images, labels, sample indices, (path, error) of the images
# of the batch that did not decode; they are left out of the first three).
RawBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]


class Loader(ABC):
    """Batches of (images N x 3 x H x W, int64 labels) of one split for one rank, resumable."""

    reads_urls = False  # whether the back end reads a data root in object storage itself

    def __init__(self, cfg: DataConfig, classes: list[str], num_samples: int, *, source: str,
                 train: bool, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.classes = classes
        self.num_samples = num_samples
        self.batch_size = cfg.batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.sampler = ResumableSampler(num_samples, shuffle=train, seed=seed, rank=rank,
                                        world_size=world_size, pad=train)
        if len(self) == 0:
            raise UserError(
                f"{source} gives each of {world_size} processes {len(self.sampler)} images, "
                f"fewer than one batch of data.batch_size={cfg.batch_size}; lower "
                "data.batch_size or use fewer processes"
            )
        self.epoch = 0
        self.consumed = 0  # samples of this epoch's global order handed out, over all ranks
        per_epoch = len(self) * self.batch_size if train else len(self.sampler)
        self.counter = BadImageCounter(cfg.max_bad_fraction, per_epoch)

    @abstractmethod
    def _load(self, indices: np.ndarray) -> Iterator[RawBatch]:
        """Load `indices` (sample indices into the split) in order, batch_size at a time (the
        last batch may be smaller); one RawBatch per batch, good images or not."""

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank."""
        return self._batches(self.num_samples)

    @property
    def batches_left(self) -> int:
        """Batches of the current epoch this rank has still to hand out."""
        return self._batches(self.num_samples - self.consumed)

    def _batches(self, remaining: int) -> int:
        share = self.sampler.share(remaining)
        return share // self.batch_size if self.train else math.ceil(share / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start `epoch` (at its batch `start_batch` of this loader's own geometry: the old way
        of resuming; `load_state_dict` resumes on any world size)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(self)} batches")
        self.epoch = epoch
        self.consumed = min(start_batch * self.batch_size * self.world_size, self.num_samples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = state["consumed"]
        if state.get("num_samples", self.num_samples) != self.num_samples:
            # Another permutation: the first `consumed` positions are other samples now.
            log.warning("the split had %d images when the checkpoint was written and has %d now: "
                        "epoch %d goes on at the same position of a different order (some images "
                        "are seen twice in it, others not at all)", state["num_samples"],
                        self.num_samples, state["epoch"])
            consumed = min(consumed, self.num_samples)
        self.epoch = state["epoch"]
        self.consumed = consumed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.batches_with_indices():
            yield images, labels

    def batches_with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, sample indices into the split's index) for the rest of the epoch."""
        self.sampler.set_epoch(self.epoch, self.consumed)
        indices = self.sampler.indices()[: self.batches_left * self.batch_size]
        per_batch = self.batch_size * self.world_size
        for images, labels, ids, bad in self._load(indices):
            # Count before yielding: while the caller holds batch k, state_dict() says k batches
            # are consumed, so a checkpoint taken after its step resumes at batch k + 1.
            self.consumed = min(self.consumed + per_batch, self.num_samples)
            self.counter.record(len(ids) + len(bad), bad)
            if len(ids):
                yield images, labels, ids

    @property
    def bad_files(self) -> list[str]:
        """Images that failed to decode during this run, by path."""
        return self.counter.bad_files

    @property
    def seen(self) -> int:
        """Images attempted (good or bad) since the loader was built."""
        return self.counter.seen
