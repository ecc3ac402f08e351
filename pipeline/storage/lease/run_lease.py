"""RunLease: one writer per run, enforced by a small lease object in the checkpoint location.

Two trainers started on the same run would both write `step-<n>/` and overwrite each other. The
writer (rank 0) therefore holds a lease, the record `<checkpoint url>/lease.json` (record.py):

    lease = RunLease(store.url, ttl=cfg.checkpoint.lease_ttl, fs=store.fs, root=store.root)
    lease.acquire()          # LeaseHeldError (one line naming the holder) when someone holds it
    ...
    lease.check()            # before every checkpoint write: LeaseLostError once fenced
    store.save(step, state)
    ...
    lease.release()

Protocol
- acquire: create the object only if absent. If it exists it is taken over only when it expired
  (renewed + ttl < now), or its holder is provably gone (holder.py): a process of this machine
  (same boot id, host and pid namespace) that no longer exists; the same SLURM job requeued (same
  job id, a higher SLURM_RESTART_COUNT: SLURM ends a job before requeueing it). Anything else,
  including a Ray worker group restarted on another node, waits for the expiry: LeaseHeldError.
  A record dated ahead of this host's clock by more than its ttl is watched, re-read about once a
  second, for one ttl (the longer of ours and its own, at most MAX_TTL), with one line saying so.
  Unchanged: its holder is not renewing, and it is taken over with a warning naming why. Renewed
  meanwhile: a live holder whose clock is wrong; LeaseHeldError names the difference and the fix
  (that host's clock: NTP, or stop that job). Gone, or replaced by a record dated by a sane
  clock: judged again as usual.
- heartbeat: a daemon thread rewrites `renewed` every ttl/4, conditionally on the object still
  being the one this process last wrote, also past our expiry after an outage. When it is not
  (someone took over after we expired), the lease is LOST. While storage cannot be reached past
  our expiry, check() refuses each write (LeaseStorageError) until a renewal succeeds. A renewal
  is one try (the checkpoint store's S3 client does not retry underneath): one that fails is
  logged and tried again at the next beat, three more before the lease expires.
- check(): raises LeaseLostError when the heartbeat found the lease lost, and re-reads the object
  (one GET) so that a writer never writes after another holder's takeover became visible.
- release(): stops the heartbeat and deletes the object only if it is still ours.
What is atomic where: local.py (link, flock) and s3.py (conditional requests).

Fencing is as good as storage allows: the checkpoint store asks check() before it moves anything
and again right before it commits a checkpoint's manifest, so the window is one GET to that PUT;
a writer paused exactly inside it (SIGSTOP, a long GC pause) past its expiry can still commit
once: at most the one checkpoint it was about to save.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.errors import UserError
from pipeline.storage.lease.backend import backend_for
from pipeline.storage.lease.errors import LeaseHeldError, LeaseLostError, LeaseStorageError
from pipeline.storage.lease.holder import holder_identity, takeover_reason
from pipeline.storage.lease.local import LOCK_WAIT_MAX
from pipeline.storage.lease.record import (
    ahead,
    describe,
    encode,
    expires,
    iso,
    judged_ttl,
    seconds,
)
from pipeline.storage.retry import retry_storage

log = logging.getLogger(__name__)
T = TypeVar("T")


class RunLease:
    """The lease of the checkpoint location `url`, which is `root` on the file system `fs` (the
    checkpoint store's); `ttl` is checkpoint.lease_ttl, which the config keeps within
    (0, MAX_TTL]."""

    def __init__(self, url: str, *, ttl: float, fs: Any, root: str):
        self.url = url.rstrip("/")
        self.ttl = float(ttl)
        self._backend = backend_for(fs, root.rstrip("/"), self.url,
                                    lock_timeout=min(self.ttl / 2, LOCK_WAIT_MAX))
        self._holder = holder_identity()
        self._lock = threading.Lock()  # guards the state below between caller and heartbeat
        self._token = ""
        self._version = ""
        self._renewed = 0.0
        self._lost = ""  # why the lease was lost; "" while held or never acquired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease (creating or taking it over) and start the heartbeat, or raise
        LeaseHeldError naming the live holder."""
        if self._token and not self._lost:
            return
        self._holder = holder_identity()  # now: pid and restart count of the process that runs
        token = uuid.uuid4().hex
        self._lost = ""
        for _ in range(8):  # each round re-reads after losing a race; one winner per round
            current = self._retry(self._backend.read, "read")
            now = time.time()
            if current is None:
                record = encode(token, now, self.ttl, self._holder)
                version = self._retry(lambda r=record: self._backend.create(r), "create")
            else:
                old, old_version = current
                if old["token"] == token:  # our write did land (a retried request, say)
                    version = old_version
                else:
                    reason = takeover_reason(old, self._holder, now)
                    if reason is None and ahead(old, now):
                        reason = self._watch(old, old_version)
                        if reason is None:
                            continue  # released, or renewed by a sane clock: judge it again
                        now = time.time()  # our lease starts now, not before the watch
                    if reason is None:
                        raise LeaseHeldError(self._held_message(old, now))
                    log.warning("run lease %s: taking over from %s: %s", self._backend.where,
                                describe(old, now), reason)
                    record = encode(token, now, self.ttl, self._holder)
                    version = self._retry(
                        lambda r=record, v=old_version: self._backend.swap(r, v), "take over")
            if version is None:
                continue  # someone else changed it first: look again
            # Read back: a server that ignored the condition would have let two creators in.
            mine = self._retry(self._backend.read, "read back")
            if mine is None or mine[0]["token"] != token:
                continue
            with self._lock:
                self._token, self._version = token, mine[1]
                self._renewed = mine[0]["renewed"]
            self._start_heartbeat()
            log.info("run lease %s acquired (ttl %.0f s)", self._backend.where, self.ttl)
            return
        current = self._retry(self._backend.read, "read")
        if current is None:
            raise LeaseStorageError(f"run lease {self._backend.where} kept changing while it was "
                                    "acquired; try again")
        raise LeaseHeldError(self._held_message(current[0], time.time()))

    def check(self) -> None:
        """Raise LeaseLostError unless this process still holds the lease: one GET."""
        if not self._token:
            raise RuntimeError("RunLease.check() before acquire()")
        if self._lost:
            raise LeaseLostError(self._lost)
        try:
            current = self._backend.read()
        except Exception as e:  # storage trouble: trust our own clock until our lease ends
            with self._lock:
                expiry = self._renewed + self.ttl
            if time.time() < expiry:
                log.warning("run lease %s: cannot read it (%s: %s); still ours by our clock for "
                            "%.0f s", self._backend.where, type(e).__name__, e,
                            expiry - time.time())
                return
            # Not lost for good: the next renewal tells. This one write is refused (a failed
            # save, counted like any other) since another process may hold the lease now.
            raise LeaseStorageError(
                f"run lease {self._backend.where} could not be read ({type(e).__name__}: {e}) "
                f"and expired by our clock at {iso(expiry)}: not writing until it is "
                "confirmed ours") from e
        if current is None or current[0]["token"] != self._token:
            self._mark_lost(self._fenced_message(current))
            raise LeaseLostError(self._lost)

    def raise_if_lost(self) -> None:
        """LeaseLostError when the heartbeat found the lease taken over; no storage call, so
        cheap enough for every log step."""
        if self._lost:
            raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Idempotent."""
        self._stop_heartbeat()
        with self._lock:
            token, version, lost = self._token, self._version, self._lost
            self._token = ""
        if not token or lost:
            return  # never held, released already, or fenced: the lease is someone else's now
        try:
            if not self._retry(lambda: self._backend.delete(version), "release"):
                current = self._backend.read()
                if current is not None and current[0]["token"] == token:  # ours, newer version
                    self._retry(lambda: self._backend.delete(current[1]), "release")
        except UserError as e:  # it expires by itself; a failed release must not fail a run
            log.warning("run lease %s not released (it expires in %.0f s): %s",
                        self._backend.where, self.ttl, e)

    # -- acquiring ----------------------------------------------------------------------------

    def _watch(self, old: dict[str, Any], version: str) -> str | None:
        """Judge a lease dated ahead of our clock by whether it changes (module docstring): the
        takeover reason when it stayed unchanged for a ttl; LeaseHeldError when its holder
        renewed it; None when it went away or now bears a time that clocks can judge."""
        span = max(self.ttl, judged_ttl(old))
        log.warning("run lease %s is held by %s: its expiry cannot be judged by clocks; "
                    "watching it for %.0f s, taken over unless its holder renews it",
                    self._backend.where, describe(old), span)
        deadline = time.monotonic() + span
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(1.0, span / 8, left))
            current = self._retry(self._backend.read, "read")
            if current is not None and current[1] == version:
                continue
            if current is None or not ahead(current[0], time.time()):
                return None
            raise LeaseHeldError(
                f"run lease {self._backend.where} is held by {describe(current[0])}: it renewed "
                f"the lease while this process watched it, so its clock is about "
                f"{seconds(current[0]['renewed'] - time.time())} ahead of this host's; fix "
                "that host's clock (NTP) or stop that job, or use another name=/checkpoint.url")
        return (f"it is dated {seconds(old['renewed'] - time.time())} ahead of this host's "
                f"clock and its holder did not renew it in {span:.0f} s")

    def _held_message(self, old: dict[str, Any], now: float) -> str:
        if ahead(old, now):  # its holder renewed it meanwhile, or a racing taker's clock
            wait = "fix that host's clock (NTP)"
        else:
            wait = f"wait for its lease to expire in {seconds(max(0.0, expires(old) - now))}"
        return (f"run lease {self._backend.where} is held by {describe(old, now)}; stop that "
                f"job, or {wait}, or use another name=/checkpoint.url")

    def _fenced_message(self, current: tuple[dict[str, Any], str] | None) -> str:
        if current is None:
            taker = "someone deleted it"
        else:
            taker = (f"{describe(current[0])} took over the lease at "
                     f"{current[0]['holder'].get('started')}")
        return (f"fenced: {taker} ({self._backend.where}); this process stops writing "
                "checkpoints")

    def _mark_lost(self, why: str) -> None:
        with self._lock:
            if not self._lost:
                self._lost = why
                log.error("run lease lost: %s", why)
        self._stop.set()

    # -- heartbeat ----------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(self._stop,),
                                        name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # a renewal stuck in a dead connection must not hold up an exit (a daemon thread)
            self._thread.join(timeout=min(5.0, self.ttl / 4))
        self._thread = None

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 4):
            self._beat()

    def _beat(self) -> None:
        with self._lock:
            token, version, renewed = self._token, self._version, self._renewed
        if not token or self._lost:
            return
        now = time.time()
        # Renewed by compare-and-swap even past our expiry (storage was down for a whole ttl):
        # if nobody took the lease meanwhile the swap succeeds and it is still ours; if someone
        # did, the swap fails and we are fenced. Our own clock alone decides nothing.
        try:
            new_version = self._backend.swap(encode(token, now, self.ttl, self._holder), version)
            if new_version is None:
                current = self._backend.read()
                if current is not None and current[0]["token"] == token:
                    new_version = current[1]  # our write landed though the reply said no
                    now = current[0]["renewed"]
                else:
                    self._mark_lost(self._fenced_message(current))
                    return
        except Exception as e:  # transient: logged, tried again at the next beat
            log.warning("run lease %s: renewal failed (%s: %s); retrying in %.0f s (it expires "
                        "at %s unless renewed)", self._backend.where, type(e).__name__, e,
                        self.ttl / 4, iso(renewed + self.ttl))
            return
        with self._lock:
            if self._token == token:
                self._version, self._renewed = new_version, now

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """`call()` under the project's storage retry policy; a lease.json of another shape is
        one line naming the fix."""
        try:
            return retry_storage(call, f"run lease: {what}", self._backend.where, retries=3,
                                 delay=0.5, log=log)
        except ValueError as e:  # json, or not our format: a person must look at it
            raise UserError(f"run lease {self._backend.where} is not a lease this version "
                            f"writes ({e}); delete it if no job is running") from e
