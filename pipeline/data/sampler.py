"""The order of an epoch, how it is shared out to the ranks, and how far it has been consumed.

Epoch e's global order is a permutation of the split's n samples seeded by (seed, e) (the
identity without shuffling). Its position is one number, `consumed`: how many samples at the
front of that order have been handed out, over all ranks together. The rest is shared out by
interleaving: rank r of W takes positions consumed + r, consumed + r + W, ... So after k steps
of b samples on each of W ranks exactly the first k * b * W positions are consumed, whatever W and
b were, and a loader built for any other world size or batch size can go on from there: every
remaining sample exactly once, over the new ranks.

    sampler = ResumableSampler(n, shuffle=True, seed=seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch, consumed)  # consumed = 0 at the start of an epoch
    for i in sampler: ...               # this rank's share of the rest of the epoch
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """One 64-bit generator seed per tuple of ints (run seed, epoch, sample, ...).

    Not seed + n as in DistributedSampler: there seed 1 epoch 0 repeats seed 0 epoch 1, so
    separately seeded ensemble members would share data orders.
    """
    h = 0
    for p in parts:
        h = (h * 0x9E3779B97F4A7C15 + p + 1) % 2**64
    return h


class ResumableSampler:
    """This rank's share of the rest of an epoch's global order.

    With `pad` (training) the rest is padded by wrapping around the epoch's order to a multiple
    of world_size, so every rank runs the same number of steps (DistributedSampler's rule; only
    the padding repeats samples). Without it (evaluation) ranks may differ by one sample and every
    sample is seen exactly once.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.consumed = 0  # positions of the epoch's global order handed out, on all ranks

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside 0..{self.num_samples} samples")
        self.epoch = epoch
        self.consumed = consumed

    def order(self) -> np.ndarray:
        """The epoch's global order: every sample index once."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=g).numpy()

    def indices(self) -> np.ndarray:
        """This rank's share of the positions not yet consumed, in order."""
        order = self.order()
        rest = order[self.consumed :]
        if self.pad:
            short = self.share(len(rest)) * self.world_size - len(rest)
            rest = np.concatenate([rest, np.resize(order, short)])  # wraps, repeatedly if needed
        return rest[self.rank :: self.world_size]

    def share(self, remaining: int) -> int:
        """How many of `remaining` positions this rank takes."""
        if self.pad:
            return math.ceil(remaining / self.world_size)
        return len(range(self.rank, remaining, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.share(self.num_samples - self.consumed)


def position_from_step(step: int, *, num_samples: int, batch_size: int,
                       world_size: int) -> dict[str, int]:
    """The training loader's state after `step` optimizer steps of a run that kept no loader
    state (checkpoints written before it did): `batch_size` per rank on `world_size` ranks, the
    geometry of the run that wrote the checkpoint (its stored config and meta["world_size"]),
    not necessarily the current one. Load it with `loader.load_state_dict(...)`."""
    steps_per_epoch = math.ceil(num_samples / world_size) // batch_size
    epoch, batch = divmod(step, steps_per_epoch)
    return {"epoch": epoch, "consumed": min(batch * batch_size * world_size, num_samples),
            "num_samples": num_samples}
