"""What a checkpoint holds of a run (`RunState`), and random-number-generator state as
checkpointable tensors (loadable with weights_only=True)."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data.sampler import mix_seed

log = logging.getLogger(__name__)


class RunState:
    """A run's state, one object for the save and the resume: the model, optimizer, grad scaler
    and loss (with their own `state_dict`s), every rank's random generators, the training data's
    position, and the epoch and optimizer step. The data position is what lets a run go on with
    another number of ranks (pipeline/data/sampler.py)."""

    KEYS = ("model", "optimizer", "scaler", "loss", "rng", "data", "epoch", "step")

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, loss: torch.nn.Module, data: Any, *,
                 rank: int, seed: int):
        """`data`: the training loader (`state_dict`/`load_state_dict`); `rank`, `seed`: to
        seed a rank that did not exist when the checkpoint was written."""
        self.model, self.optimizer, self.scaler, self.loss, self.data = \
            model, optimizer, scaler, loss, data
        self.rank, self.seed = rank, seed
        self.epoch = 0
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """A collective (every rank's random state is gathered): every rank must call it; the
        result is complete on rank 0, the writer."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "loss": self.loss.state_dict(),
                "rng": capture_rng_all_ranks(), "data": self.data.state_dict(),
                "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.load_state_dict(state["loss"])
        self.data.load_state_dict(state["data"])
        self.epoch, self.step = state["epoch"], state["step"]
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
