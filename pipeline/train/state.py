"""Random-number-generator state as checkpointable tensors (loadable with weights_only=True)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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
