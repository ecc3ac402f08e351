"""What a saved checkpoint says of the run that wrote it, read the same way for checkpoints of
every version this project wrote (older ones left parts out): `SavedRun`, for the resume
(pipeline/train) and for evaluation, export and the EANN assembly (pipeline/evaluation.py
load_member). RunState.meta (pipeline/train/state.py) writes the metadata; besides this
module, only the store's retention (`epoch`, `end_of_epoch`) and the listings (`epoch`) read
it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.index import DataIdentity
from pipeline.data.sampler import position_from_step
from pipeline.storage.checkpoints import CheckpointInfo, CheckpointStore

log = logging.getLogger(__name__)

# What every checkpoint this project wrote holds; a payload without them is not a run's state
# (another tool's file, say). Parts added later ("data", "clock") may be missing from old ones.
EVERY_VERSION_WROTE = ("model", "optimizer", "scaler", "loss", "rng", "step")


def not_a_run_state(state: Any) -> str | None:
    """What a verified payload lacks to resume a run from, or None."""
    if not isinstance(state, dict):
        return f"its payload is a {type(state).__name__}, not a run's state"
    missing = [key for key in EVERY_VERSION_WROTE if key not in state]
    return f"its state lacks {', '.join(missing)}" if missing else None


@dataclass
class SavedRun:
    """A run's checkpoint (the one a run resumes from, a member to evaluate): its payload, and
    what its metadata says of the run."""

    name: str
    where: str  # its URL, for messages
    meta: dict[str, Any]
    state: dict[str, Any]
    world_size_now: int  # the resuming job's: what the oldest checkpoints are taken to have

    @classmethod
    def latest(cls, store: CheckpointStore, world_size_now: int = 1) -> SavedRun | None:
        """The newest checkpoint in `store` that verifies and holds a run's state, or None."""
        latest = store.load_latest_valid(problem_of=not_a_run_state)
        return None if latest is None else cls.of(store, *latest, world_size_now)

    @classmethod
    def of(cls, store: CheckpointStore, info: CheckpointInfo, state: dict[str, Any],
           world_size_now: int = 1) -> SavedRun:
        """A checkpoint already read from `store` (`store.load(info)`)."""
        return cls(info.name, f"{store.url}/{info.name}", info.meta, state, world_size_now)

    @property
    def config(self) -> dict[str, Any] | None:
        """The config it was trained with (`Config.to_dict()`); None from the oldest versions."""
        config = self.meta.get("config")
        return config if isinstance(config, dict) else None

    @property
    def dataset(self) -> DataIdentity | None:
        """The data set it was trained on (its class folders and training images); None where
        it records none (older versions). ValueError where it records one in a form this code
        does not read."""
        return DataIdentity.from_meta(self.meta["dataset"]) if "dataset" in self.meta else None

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
