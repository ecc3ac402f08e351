"""When and how the trainer saves the run's state (`RunState`): at the end of every epoch (the
last one synchronously), every checkpoint.every_steps steps within an epoch, and when asked
(preemption, synchronously). A save is a host-memory snapshot at a step boundary, written by one
background thread so training goes on.

Storage outages are absorbed: a failed save is logged and the next one tries again. While a
save is still being written (slow or failing storage, retrying) the next one due is skipped
instead of waited for, so the training thread does not stall on storage; once
checkpoint.max_failed_saves saves in a row were missed (failed or skipped), it waits for the one in
flight, and if that failed too the run stops rather than train on without a safety net. A
save that must land before the run goes on or ends (preemption, the last one) is tried up to
checkpoint.max_failed_saves times.

Fencing: the writer checks that it still holds the run's lease (`pipeline.storage.lease`)
before it moves anything and right before each commit, and at every log step; a writer whose
lease was taken over stops the run instead of writing beside the new holder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pipeline.config import CheckpointConfig
from pipeline.distributed import run_on_main
from pipeline.errors import UserError
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.storage.lease import LeaseLostError, RunLease
from pipeline.train.state import RunState

log = logging.getLogger("pipeline.train")


class Checkpointer:
    def __init__(self, store: CheckpointStore, run: RunState, cfg: CheckpointConfig, *,
                 writer: bool, lease: RunLease | None = None,
                 before_save: Callable[[], None] = lambda: None):
        """`writer`: this rank writes (one does; the others take part in each save's
        collectives); `before_save`: runs on every rank before each save and may raise to stop
        it (the trainer's check that the state is finite)."""
        self.store, self.run, self.cfg = store, run, cfg
        self.writer = writer
        self.lease = lease
        self.before_save = before_save
        self.fenced: LeaseLostError | None = None
        self.failed_in_a_row = 0
        self.skipped_in_a_row = 0  # due while the one before was still being written
        self.last_error = ""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint",
                                        initializer=_lower_priority)
        self._in_flight: Future | None = None

    def after_step(self, epoch_ends: bool) -> None:
        """Save when checkpoint.every_steps is due, unless the step ends the epoch (the epoch's
        own save follows its validation)."""
        every = self.cfg.every_steps
        if every and self.run.step % every == 0 and not epoch_ends:
            self.save(end_of_epoch=False)

    def after_epoch(self, last: bool) -> None:
        """The epoch's save; the run's last is written before the run goes on to its report."""
        self.save(end_of_epoch=True, blocking=last)

    def save(self, end_of_epoch: bool, blocking: bool = False) -> None:
        """Snapshot the run's state now; write it in the background, or before returning if
        `blocking`.

        Every rank calls it at the same steps. When the writer has to stop the run (saves keep
        failing, the lease was lost), every rank raises the same error: no rank is left waiting
        in a collective for one that has gone."""
        self.before_save()
        state, meta = self.run.state_dict(), self.run.meta(end_of_epoch)  # a collective
        run_on_main(lambda: self._save(self.run.step, state, meta, blocking))

    def _save(self, step: int, state: dict[str, Any], meta: dict[str, Any],
              blocking: bool) -> None:
        if not self.writer:
            return
        if self.busy and not blocking:
            self.skipped_in_a_row += 1
            if self.failed_in_a_row + self.skipped_in_a_row < self.cfg.max_failed_saves:
                log.warning("checkpoint step %d skipped: the save before it is still being "
                            "written to %s; training goes on", step, self.store.url)
                return
            # So many saves missed in a row: wait for the one in flight rather than train on
            # unprotected; if it fails too, wait() stops the run.
        self.wait()  # one save at a time: keeps memory bounded and checkpoints in step order
        snapshot = to_host(state)
        self._in_flight = self._pool.submit(self._write, step, snapshot, meta)
        if blocking or not self.cfg.async_save:
            self.wait()
            # A save that must land now (preemption, the run's last) is tried again while the
            # storage recovers, up to max_failed_saves in a row: its state is only in memory.
            while 0 < self.failed_in_a_row < self.cfg.max_failed_saves and self.fenced is None:
                self._in_flight = self._pool.submit(self._write, step, snapshot, meta)
                self.wait()
            if self.failed_in_a_row:
                raise UserError(f"could not save checkpoint step {step} to {self.store.url}: "
                                f"{self.last_error}")

    def raise_if_fenced(self) -> None:
        """Every rank raises LeaseLostError as soon as the writer's heartbeat found its lease
        taken over (no storage call: cheap at every log step), so a fenced run stops training
        and logging at once instead of at its next save."""
        run_on_main(lambda: self.lease.raise_if_lost() if self.lease else None)

    @property
    def busy(self) -> bool:
        """A save is being written right now."""
        return self._in_flight is not None and not self._in_flight.done()

    def wait(self) -> None:
        """Let the save in flight finish; stop the run once too many saves failed in a row."""
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None
        if self.fenced is not None:
            raise self.fenced
        missed = self.failed_in_a_row + self.skipped_in_a_row
        if self.failed_in_a_row and missed >= self.cfg.max_failed_saves:
            skipped = (f", {self.skipped_in_a_row} more skipped while they were retried"
                       if self.skipped_in_a_row else "")
            raise UserError(
                f"{missed} checkpoint saves in a row to {self.store.url} missed: "
                f"{self.failed_in_a_row} failed{skipped} (last error: {self.last_error}); "
                "stopping so no more unsaved work piles up. Check the storage and its "
                "credentials, then rerun with resume=auto"
            )

    def close(self) -> None:
        """Let a save in flight finish (its errors were logged), then stop the writer thread."""
        self._pool.shutdown(wait=True)

    def _write(self, step: int, snapshot: dict[str, Any], meta: dict[str, Any]) -> None:
        try:
            # fencing: never write once another job holds the run
            name = self.store.save(step, snapshot, meta,
                                   may_write=self.lease.check if self.lease else None)
        except LeaseLostError as e:  # not a storage failure: no retry can make it right
            self.fenced = e
            log.error("checkpoint step %d not written: %s", step, e)
            return
        except Exception as e:  # logged and counted; the training thread decides what follows
            self.failed_in_a_row += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("checkpoint step %d to %s failed (%d in a row): %s", step, self.store.url,
                      self.failed_in_a_row, self.last_error)
            return
        self.failed_in_a_row = self.skipped_in_a_row = 0
        log.info("checkpoint %s/%s saved", self.store.url, name)


def _lower_priority() -> None:
    """Let the training threads win the CPU over serialising, hashing and uploading: Linux
    schedules each thread on its own, so the writer thread alone gets nice 10 (about a tenth of
    a contended core). On a GPU node the CPU is mostly idle and the save runs at full speed."""
    # Not Linux, or not allowed: run at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, detached from the training state it came from."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj
