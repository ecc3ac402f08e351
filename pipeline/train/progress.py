"""What a running job tells its user: a periodic progress line; metrics in JSONL + TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline.train")


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                for i, v in enumerate(value, start=1):
                    self.tensorboard.add_scalar(f"{kind}/{key}/exit{i}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


class Progress:
    """Counts images and, when `due`, logs `step, values, images/s, ETA` for the last interval.

    Values are read only when a line is due, so the training step never waits on the device
    just to be logged.
    """

    def __init__(self, total_steps: int, done_steps: int, every: int, enabled: bool = True):
        self.total_steps = total_steps
        self.every = max(1, every)
        self.enabled = enabled
        self.last_time = time.perf_counter()
        self.last_step = done_steps
        self.images = 0
        self.rate = 0.0  # images/s over the last logged interval

    def advance(self, batch_images: int) -> None:
        self.images += batch_images

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def log(self, step: int, epoch: int, epochs: int, values: dict[str, float]) -> None:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        self.rate = self.images / elapsed
        eta = (self.total_steps - step) * elapsed / max(step - self.last_step, 1)
        if self.enabled:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            log.info("epoch %d/%d  step %d/%d  %s  %.0f img/s  eta %s", epoch + 1, epochs, step,
                     self.total_steps, shown, self.rate, format_duration(eta))
        self.last_time, self.last_step, self.images = now, step, 0


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
