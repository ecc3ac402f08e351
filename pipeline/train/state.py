"""What a checkpoint holds of a run (`RunState`), what a saved one says of itself
(`SavedRun`, with the readers of what older versions left out), and random-number-generator
state as checkpointable tensors (loadable with weights_only=True).

Adding a checkpointed part is one edit: an entry in the `parts` the trainer gives RunState
(anything with `state_dict` / `load_state_dict`). A checkpoint written before the part existed
resumes with the part as built, and a warning names it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data import position_from_step
from pipeline.data.sampler import mix_seed
from pipeline.storage.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

# What every checkpoint this project wrote holds; a payload without them is not a run's state
# (another tool's file, say). Parts added later ("data", "clock") may be missing from old ones.
EVERY_VERSION_WROTE = ("model", "optimizer", "scaler", "loss", "rng", "step")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RunState:
    """A run's state, one object for the save and the resume: its parts (model, optimizer, grad
    scaler, loss, the training data's position, ..., each with its own `state_dict`), every
    rank's random generators, and the epoch and optimizer step. The data position is what lets
    a run go on with another number of ranks (pipeline/data/sampler.py)."""

    def __init__(self, parts: dict[str, Stateful], *, rank: int, seed: int,
                 about: dict[str, Any]):
        """`rank`, `seed`: to seed a rank that did not exist when the checkpoint was written;
        `about`: what every checkpoint of this start says of the run (its config, number of
        processes, global batch, data set, code version), readable without its tensors."""
        self.parts = parts
        self.rank, self.seed = rank, seed
        self.about = about
        self.epoch = 0
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """A collective (every rank's random state is gathered): every rank must call it; the
        result is complete on rank 0, the writer. The epoch is in the meta too; it stays here
        for the versions that read it from here."""
        return {**{name: part.state_dict() for name, part in self.parts.items()},
                "rng": capture_rng_all_ranks(), "epoch": self.epoch, "step": self.step}

    def meta(self, end_of_epoch: bool) -> dict[str, Any]:
        """The checkpoint's metadata. The store's retention reads `epoch` and `end_of_epoch`
        (pipeline/storage/checkpoints.py); the resume reads the rest (`SavedRun`)."""
        return {"epoch": self.epoch, "end_of_epoch": end_of_epoch, **self.about}

    def load(self, saved: SavedRun) -> None:
        state = saved.state
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif name == "data":  # the position, from the step, as the version that wrote it
                part.load_state_dict(saved.data_position_from_step(part.num_samples))
            else:
                log.warning("checkpoint %s holds no %s state (an older version wrote it): it "
                            "starts afresh", saved.where, name)
        self.epoch, self.step = saved.epoch, state["step"]
        if not restore_rng_of_rank(state["rng"], self.rank):
            # A rank the checkpoint's job did not have: a seed of its own, the same on every
            # resume of this checkpoint, and not one an existing rank started from.
            seed = mix_seed(self.seed, self.rank, self.step) % 2**32
            seed_everything(seed)
            log.warning("rank %d did not exist when step %d was saved: seeded its generators "
                        "from (seed %d, rank %d, step %d) = %d", self.rank, self.step,
                        self.seed, self.rank, self.step, seed)


def not_a_run_state(state: Any) -> str | None:
    """What a verified payload lacks to resume a run from, or None."""
    if not isinstance(state, dict):
        return f"its payload is a {type(state).__name__}, not a run's state"
    missing = [key for key in EVERY_VERSION_WROTE if key not in state]
    return f"its state lacks {', '.join(missing)}" if missing else None


@dataclass
class SavedRun:
    """The checkpoint a run resumes from: its payload, and what its metadata says of the run,
    read the same way for checkpoints of every version (older ones left parts out)."""

    name: str
    where: str  # its URL, for messages
    meta: dict[str, Any]
    state: dict[str, Any]
    world_size_now: int  # the resuming job's: what the oldest checkpoints are taken to have

    @classmethod
    def latest(cls, store: CheckpointStore, world_size_now: int) -> SavedRun | None:
        """The newest checkpoint in `store` that verifies and holds a run's state, or None."""
        latest = store.load_latest_valid(problem_of=not_a_run_state)
        if latest is None:
            return None
        info, state = latest
        return cls(info.name, f"{store.url}/{info.name}", info.meta, state, world_size_now)

    @property
    def config(self) -> dict[str, Any] | None:
        """The config it was trained with (`Config.to_dict()`); None from the oldest versions."""
        config = self.meta.get("config")
        return config if isinstance(config, dict) else None

    @property
    def epoch(self) -> int:
        return self.meta.get("epoch", self.state.get("epoch", 0))

    @property
    def world_size(self) -> int:
        """The number of ranks that wrote it: its meta, else one random state per rank; the
        oldest checkpoints say neither, and are resumed on the job's own number."""
        if "world_size" in self.meta:
            return self.meta["world_size"]
        rng = self.state.get("rng")
        return len(rng) if isinstance(rng, list) else self.world_size_now

    @property
    def global_batch(self) -> int | None:
        """The global batch it was trained with; None where it does not say."""
        if "global_batch" in self.meta:
            return self.meta["global_batch"]
        if self.config is None:
            return None
        return self._batch_size * self.world_size

    @property
    def _batch_size(self) -> int:
        return (self.config or {}).get("data", {}).get("batch_size", DataConfig.batch_size)

    def data_position_from_step(self, num_samples: int) -> dict[str, int]:
        """The data position of a checkpoint written before checkpoints held it: from its
        step, in the geometry of the run that wrote it, as that version resumed."""
        max_steps = (self.config or {}).get("train", {}).get("max_steps_per_epoch", 0)
        log.info("checkpoint %s holds no data position (an older version wrote it): epoch %d "
                 "goes on from step %d, as %d ranks x %d images per step", self.name,
                 self.epoch, self.state["step"], self.world_size, self._batch_size)
        return position_from_step(self.state["step"], epoch=self.epoch, num_samples=num_samples,
                                  batch_size=self._batch_size, world_size=self.world_size,
                                  max_steps_per_epoch=max_steps)


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_rng_all_ranks() -> list[dict[str, Any]] | None:
    """Every rank's generator states, in rank order, on rank 0 (the checkpoint writer; None on
    the others): each rank draws its own numbers (dropout masks, ...), so an exact resume needs
    them all. A collective: every rank must call it."""
    state = capture_rng()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def restore_rng_of_rank(saved: list[dict[str, Any]] | dict[str, Any], rank: int) -> bool:
    """Restore `rank`'s states from a checkpoint; False when it holds none for that rank (the job
    grew). Checkpoints written before per-rank states hold one dict: rank 0's."""
    states = saved if isinstance(saved, list) else [saved]
    if rank >= len(states):
        return False
    restore_rng(states[rank])
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
