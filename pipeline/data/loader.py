"""What every back end gives the trainer, and the bookkeeping they share: the epoch's position as
checkpoint state, the rank's share of the order, the bad-image count.

    loader = build_loader(cfg.data, "train", train=True, rank=rank, world_size=world, seed=seed)
    loader.set_epoch(epoch)
    loader.load_state_dict(saved)         # after a resume: on any world size or batch size
    for batches in loader.steps(): ...    # one optimizer step: `accumulation` (images, labels)
    for images, labels in loader: ...     # or loader.batches_with_indices(): + sample indices
    saved = loader.state_dict()           # {"epoch", "consumed", "num_samples"}: plain ints

`consumed` counts the samples of the epoch's global order handed out so far over all ranks
(per-rank batch x world size per forward pass, counted when the batch is handed out), so a loader
for another number of ranks, another per-rank batch or another accumulation continues with
exactly the samples not yet consumed (pipeline/data/sampler.py). A checkpoint that holds no
loader state (written before there was any) gets it from its step: `position_from_step` in
pipeline/data/sampler.py.

A back end is one file: a subclass that implements `_load`, registered by name in
pipeline/data/factory.py (and in DataConfig's `backend`, which says what it reads).

Epoch ends. Training: whole global batches only, so every rank runs the same number of steps, and
an epoch has num_samples // global batch steps whatever the number of ranks; the samples of a last
partial global batch are left for the next epoch's shuffle. Evaluation: unpadded shards (each
image on exactly one rank) and a smaller last batch, so every image is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.badimages import BadImageCounter
from pipeline.data.index import DataIdentity
from pipeline.data.sampler import Blocks, ResumableSampler
from pipeline.errors import UserError

log = logging.getLogger(__name__)

# A batch as a back end loads it: (images, labels, sample indices, (path, error) of the images
# of the batch that did not decode; they are left out of the first three).
RawBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]


class Loader(ABC):
    """Batches of (images N x 3 x H x W, int64 labels) of one split for one rank, resumable."""

    # The split as listed in data.root, before `data verify`'s lists leave images out (so that a
    # verify between two starts of a run is no other data set); set by build_loader, None for
    # synthetic data. A checkpoint records the training split's (pipeline/train/trainer.py).
    identity: DataIdentity | None = None

    def __init__(self, cfg: DataConfig, classes: list[str], num_samples: int, *, source: str,
                 train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 accumulation: int = 1, blocks: Blocks | None = None):
        self.classes = classes
        self.num_samples = num_samples
        self.batch_size = cfg.batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accumulation = accumulation
        self.sampler = ResumableSampler(num_samples, shuffle=train, seed=seed, rank=rank,
                                        world_size=world_size, batch_size=cfg.batch_size * train,
                                        accumulation=accumulation, blocks=blocks)
        if len(self) == 0:
            need = (f"one global batch ({cfg.batch_size} per forward pass x {world_size} "
                    f"process(es) x {accumulation} pass(es) = {self.global_batch})" if train else
                    f"one image for each of {world_size} processes")
            raise UserError(f"{source} has {num_samples} images, fewer than {need}; use fewer "
                            "processes or a smaller batch (train.global_batch, data.batch_size)")
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
    def global_batch(self) -> int:
        """Samples of one optimizer step over all ranks (training loaders)."""
        return self.sampler.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of a whole epoch (training loaders): the same on every rank."""
        return self.num_samples // self.global_batch

    @property
    def steps_done(self) -> int:
        """Optimizer steps of the current epoch taken so far, in this loader's global batches."""
        return self.consumed // self.global_batch

    @property
    def batches_left(self) -> int:
        """Batches of the current epoch this rank has still to hand out."""
        return self._batches(self.num_samples - self.consumed)

    def _batches(self, remaining: int) -> int:
        share = self.sampler.share(remaining)
        return share // self.batch_size if self.train else math.ceil(share / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (`load_state_dict` resumes one mid-way)."""
        self.epoch = epoch
        self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.num_samples}
        blocks = self.sampler.blocks
        if blocks is not None:  # what makes the order of shards (sampler.py)
            state.update(streams=blocks.streams, blocks=len(blocks.bounds) - 1,
                         window=blocks.window)
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = state["consumed"]
        if state.get("num_samples", self.num_samples) != self.num_samples:
            # Another permutation: the first `consumed` positions are other samples now.
            log.warning("the split had %d images when the checkpoint was written and has %d now: "
                        "epoch %d goes on at the same position of a different order (some images "
                        "are seen twice in it, others not at all)", state["num_samples"],
                        self.num_samples, state["epoch"])
            consumed = min(consumed, self.num_samples)
        blocks = self.sampler.blocks
        from_shards = "streams" in state
        if from_shards != (blocks is not None):  # moved between a folder and its shards
            was, now = ("shards", "an image folder") if from_shards else \
                ("an image folder", "shards")
            log.warning("the checkpoint's position is in the order of %s; epoch %d goes on at "
                        "the same position of the order of %s (some images are seen twice in "
                        "it, others not at all)", was, state["epoch"], now)
        elif blocks is not None and (state.get("blocks"), state.get("window")) != (
                len(blocks.bounds) - 1, blocks.window) and self.train:
            log.warning("epoch %d's order was made of %s blocks shuffled %s at a time; "
                        "data.shard_block or data.shuffle_window changed since: it goes on at "
                        "the same position of another order (some images are seen twice in it, "
                        "others not at all)", state["epoch"], state.get("blocks"),
                        state.get("window"))
        if blocks is not None and from_shards and state["streams"] != blocks.streams:
            if not isinstance(state["streams"], int) or state["streams"] < 1:
                raise UserError(f"the checkpoint's data position has streams="
                                f"{state['streams']!r}, not a count; it is damaged")
            # The run's order keeps the streams it started with, whatever the ranks now.
            self.sampler.blocks = dataclasses.replace(blocks, streams=state["streams"])
        self.epoch = state["epoch"]
        self.consumed = consumed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.batches_with_indices():
            yield images, labels

    def steps(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The rest of the epoch one optimizer step at a time: the step's `accumulation`
        (images, labels) batches, every step on every rank (DDP's collectives need all ranks in
        each step). A batch whose images all failed to decode is replaced by this rank's
        previous good one, with a warning; images that failed are left out of their batch."""
        step: list[tuple[torch.Tensor, torch.Tensor]] = []
        last_good = None
        for n, (images, labels, ids) in enumerate(self._every_batch(), start=1):
            if len(ids):
                last_good = (images, labels)
            elif last_good is None:
                raise UserError(f"no image of the first batch of epoch {self.epoch} decodes on "
                                f"rank {self.rank} ({', '.join(self.counter.bad_files[-3:])} "
                                "...); run `python -m pipeline data verify` on the data root")
            else:
                log.warning("every image of a batch failed to decode on rank %d; it takes its "
                            "previous batch again so that every rank takes the step", self.rank)
            step.append(last_good)
            if n % self.accumulation == 0:
                yield step
                step = []

    def batches_with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, sample indices into the split's index) for the rest of the epoch."""
        for images, labels, ids in self._every_batch():
            if len(ids):
                yield images, labels, ids

    def _every_batch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every batch of the rest of the epoch, also one whose images all failed to decode."""
        self.sampler.set_epoch(self.epoch, self.consumed)
        indices = self.sampler.indices()[: self.batches_left * self.batch_size]
        per_batch = self.batch_size * self.world_size
        for images, labels, ids, bad in self._load(indices):
            # Count before yielding: while the caller holds batch k, state_dict() says k batches
            # are consumed, so a checkpoint taken after its step resumes at batch k + 1.
            self.consumed = min(self.consumed + per_batch, self.num_samples)
            self.counter.record(len(ids) + len(bad), bad)
            yield images, labels, ids

    @property
    def bad_files(self) -> list[str]:
        """Images that failed to decode during this run, by path."""
        return self.counter.bad_files

    @property
    def seen(self) -> int:
        """Images attempted (good or bad) since the loader was built."""
        return self.counter.seen
