"""The order of an epoch, how it is shared out to the ranks, and how far it has been consumed.

Epoch e's global order is a permutation of the split's n samples seeded by (seed, e) (the
identity without shuffling). Its position is one number, `consumed`: how many samples at the
front of that order have been handed out, over all ranks together.

Training takes the rest of the order a global batch at a time: G = b x W x A samples (b per
forward pass, W ranks, A forward passes accumulated per optimizer step), whole global batches
only; the samples of a last partial one are left to the next epoch's shuffle. A global batch is
shared out by interleaving over V = W x A "virtual ranks": position p of the batch goes to
virtual rank p mod V, and rank r's forward pass j of the step takes virtual rank j x W + r. So a
virtual rank's forward pass sees the same samples whatever mix of ranks and accumulation makes up
V: a 2-rank run and a 1-rank run accumulating 2 passes compute the same batches (the same
BatchNorm statistics too), and after k steps exactly the first k x G positions are consumed,
whatever W, b and A were. A loader built for any other geometry goes on from there: every
remaining sample exactly once, over the new ranks.

Evaluation shares the whole order out by interleaving over the W ranks, unpadded: every sample
exactly once, ranks differ by at most one sample.

    sampler = ResumableSampler(n, shuffle=True, seed=seed, rank=rank, world_size=world,
                               batch_size=b, accumulation=a)   # batch_size=0: evaluation
    sampler.set_epoch(epoch, consumed)  # consumed = 0 at the start of an epoch
    for i in sampler: ...               # this rank's share of the rest, in loading order

Shard data (pipeline/data/shards.py) is read a block at a time: a run of consecutive samples of
one shard, fetched with one request. Its epoch order (`Blocks`) keeps each rank's reads to few
blocks at once and each node's to its own blocks: the blocks are dealt to C streams, each stream
shuffles its samples within windows of a few blocks, and the global order takes the streams in
turn (position p from stream p mod C). Rank r takes the positions p = r mod W, so with W
dividing C (C = the number of ranks the run started with) a rank reads only its own streams'
blocks. C stays the run's for good: the order, and so an exact resume, never depends on the
current number of ranks; on another number of ranks a rank may read other streams' blocks too,
which costs bytes, not exactness.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Blocks:
    """The order of a data set read in blocks: `bounds` holds the first sample of each block,
    then the number of samples; `streams` (C) and `window` (blocks shuffled together) as in the
    module's notes."""

    bounds: np.ndarray
    streams: int
    window: int

    def order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        """Epoch `epoch`'s global order: every sample once. Without shuffling, blocks in order
        dealt to the streams (evaluation: stream r is rank r's share)."""
        rng = np.random.Generator(np.random.PCG64(mix_seed(seed, epoch)))
        count = len(self.bounds) - 1
        blocks = rng.permutation(count) if shuffle else np.arange(count)
        streams = []
        for s in range(self.streams):
            mine = blocks[s :: self.streams]
            parts = []
            for w in range(0, len(mine), self.window):
                window = np.concatenate([np.arange(self.bounds[b], self.bounds[b + 1])
                                         for b in mine[w : w + self.window]])
                parts.append(rng.permutation(window) if shuffle else window)
            streams.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        lengths = [len(x) for x in streams]
        turn = np.concatenate([np.arange(n) for n in lengths])  # position within its stream
        stream = np.repeat(np.arange(self.streams), lengths)
        return np.concatenate(streams)[np.lexsort((stream, turn))]


class ResumableSampler:
    """This rank's share of the rest of an epoch's global order, in the order it is loaded.

    `batch_size` > 0 (training): whole global batches of batch_size x world_size x accumulation,
    every rank the same number of samples. `batch_size` = 0 (evaluation): every sample once.
    `blocks`: the order of a data set read in blocks (shards), else a permutation of samples.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 0, accumulation: int = 1,
                 blocks: Blocks | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if accumulation < 1 or (accumulation > 1 and not batch_size):
            raise ValueError(f"accumulation={accumulation} needs a training batch_size")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.blocks = blocks
        self.epoch = 0
        self.consumed = 0  # positions of the epoch's global order handed out, on all ranks

    @property
    def global_batch(self) -> int:
        """Samples of one optimizer step over all ranks (0 for evaluation)."""
        return self.batch_size * self.world_size * self.accumulation

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside 0..{self.num_samples} samples")
        self.epoch = epoch
        self.consumed = consumed

    def order(self) -> np.ndarray:
        """The epoch's global order: every sample index once."""
        if self.blocks is not None:
            return self.blocks.order(self.seed, self.epoch, self.shuffle)
        if not self.shuffle:
            return np.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=g).numpy()

    def indices(self) -> np.ndarray:
        """This rank's share of the positions not yet consumed, in loading order (training:
        step by step, each step's forward passes one after the other)."""
        rest = self.order()[self.consumed :]
        if not self.batch_size:
            return rest[self.rank :: self.world_size]
        steps = len(rest) // self.global_batch
        virtual = self.world_size * self.accumulation
        # [step, sample of a pass, virtual rank] -> this rank's passes (virtual ranks j x W + r)
        # -> [step, pass j, sample]
        grid = rest[: steps * self.global_batch].reshape(steps, self.batch_size, virtual)
        return grid[:, :, self.rank :: self.world_size].transpose(0, 2, 1).reshape(-1)

    def share(self, remaining: int) -> int:
        """How many of `remaining` positions this rank takes."""
        if not self.batch_size:
            return len(range(self.rank, remaining, self.world_size))
        return remaining // self.global_batch * self.batch_size * self.accumulation

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.share(self.num_samples - self.consumed)


def position_from_step(step: int, *, epoch: int, num_samples: int, batch_size: int,
                       world_size: int, max_steps_per_epoch: int = 0) -> dict[str, int]:
    """The training loader's state after `step` optimizer steps of a run that kept no loader
    state (checkpoints written before it did), `epoch` of them whole: `batch_size` per rank on
    `world_size` ranks, the geometry of the run that wrote the checkpoint (its stored config and
    meta["world_size"]), not necessarily the current one. Those runs padded each rank's share
    (ceil(n / W)) and counted whole per-rank batches of it. Load it with
    `loader.load_state_dict(...)`."""
    steps_per_epoch = -(-num_samples // world_size) // batch_size
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    batch = step - epoch * steps_per_epoch
    return {"epoch": epoch, "consumed": min(batch * batch_size * world_size, num_samples),
            "num_samples": num_samples}
