"""What a running job tells its user: a periodic progress line; metrics in JSONL + TensorBoard."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from pipeline.report import format_duration

log = logging.getLogger("pipeline.train")


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and its numbers to TensorBoard
    (tensorboard/events.out.tfevents.*, one file per start of the run).

    Metrics never stop a run and never print a traceback: a record that cannot be written (a
    full disk under out_dir, a lost mount) is dropped with one warning line naming the folder
    and the error; every later record tries again, and one line says when writing works again
    and how many records were dropped. A record goes into both files whole or not at all (a
    failed append is cut back off), so neither holds half a record. The events are written here,
    record by record, rather than by TensorBoard's SummaryWriter: its background thread dies on
    the first error, with a traceback on stderr, and never writes again.
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        # TensorBoard's own naming: it reads every events.out.tfevents.* file in the folder
        self.events = run_dir / "tensorboard" / (
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0")
        self.dropped = 0  # records not written since writing last failed
        self.error = ""  # the error while writing fails

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        scalars = {}
        for key, value in values.items():
            if isinstance(value, (int, float)):
                scalars[f"{kind}/{key}"] = value
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                scalars.update({f"{kind}/{key}/exit{i}": v for i, v in enumerate(value, 1)})
        try:
            append_whole([(self.path, (json.dumps(record) + "\n").encode(), b""),
                          (self.events, tensorboard_event(record["time"], step, scalars),
                           tensorboard_event(record["time"]))])  # the file's first: its version
        except OSError as e:
            self.dropped += 1
            if not self.error:
                self.error = f"{e.strerror or e}"
                log.warning("cannot write metrics to %s (metrics.jsonl, tensorboard/): %s; "
                            "training goes on (checkpoints are saved on their own); metrics "
                            "are dropped until they can be written again", self.run_dir,
                            self.error)
            return
        if self.error:
            log.warning("metrics written to %s again; %d record(s) were dropped while it "
                        "failed (%s)", self.run_dir, self.dropped, self.error)
            self.dropped, self.error = 0, ""

    def close(self) -> None:
        if self.error:
            log.warning("%d metrics record(s) not written to %s (%s)", self.dropped,
                        self.run_dir, self.error)


def tensorboard_event(wall_time: float, step: int | None = None,
                      scalars: dict[str, float] | None = None) -> bytes:
    """One TensorBoard event as a framed record: the scalars at `step`; without them the
    file-version event that starts an events file."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    if scalars is None:
        event = Event(wall_time=wall_time, file_version="brain.Event:2")
    else:
        event = Event(wall_time=wall_time, step=step, summary=Summary(value=[
            Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]))
    buffer = io.BytesIO()
    RecordWriter(buffer).write(event.SerializeToString())
    return buffer.getvalue()


def append_whole(parts: list[tuple[Path, bytes, bytes]]) -> None:
    """Append each `(path, data, header)` (the header first into an empty file); on an OSError
    cut every file written back to its size before, then raise it."""
    done: list[tuple[Path, int]] = []
    try:
        for path, data, header in parts:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as f:  # the error may come from write() or from close()
                size = f.tell()
                done.append((path, size))
                f.write(data if size else header + data)
    except OSError:
        for path, size in done:
            with suppress(OSError):
                os.truncate(path, size)
        raise


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


class RunClock:
    """The run's training time over all its starts (results.json's `seconds`): checkpointed, so
    a resumed run adds its time to the time before; work redone after a preemption counts
    once, the time lost with it not at all."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = float(state["seconds"])
