"""What a checkpoint holds of a run (`RunState`; what a saved one says of itself: `SavedRun`,
pipeline/saved_run.py), and random-number-generator state as checkpointable tensors (loadable
with weights_only=True).

Adding a checkpointed part is one edit: an entry in the `parts` the trainer gives RunState
(anything with `state_dict` / `load_state_dict`). A checkpoint written before the part existed
resumes with the part as built, and a warning names it.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data.sampler import mix_seed
from pipeline.saved_run import SavedRun

log = logging.getLogger(__name__)

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
