"""The lease on a local (or shared) file system.

Create writes a temporary file and `os.link`s it into place (fails if the name exists, like
O_EXCL; readers never see a half-written lease). Swap (takeover, renewal) and delete are
compare-and-swaps (read, compare with what the caller read or last wrote, then temp file +
`os.replace` or unlink) inside an exclusive `flock` of `<root>/.lease.lock`, which the kernel
drops when its holder dies, but not while it is stopped (SIGSTOP, a frozen VM). Every wait for it
(and for the per-process thread lock before it) is bounded: it polls every 50 ms for at most
`lock_timeout` (min(ttl/2, LOCK_WAIT_MAX = 30 s)), logs one line after 1 s naming the lock and its
holder's pid (from /proc/locks), then raises LeaseLockTimeoutError, a LeaseHeldError (one line,
not retried). In the heartbeat that is a failed renewal: logged, tried again at the next beat.
Swaps never leave the name absent, so fresh creators cannot slip in. The flock excludes
processes on one host, and across hosts on NFSv4, GPFS and Lustre mounted with `flock` (not
`localflock`). (Renaming the stale lease to a unique name and re-creating, the lock-free
alternative, was tried: a taker that read the lease before another taker replaced it moves the
*new* lease away, and a third acquirer sees the name absent; 6 racing takers gave two winners in
about 5% of rounds.)

A version of the lease is the md5 of its bytes, which differ per write (token and time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipeline.storage.atomic import NO_HARD_LINKS, link_new, write_temp
from pipeline.storage.lease.errors import LeaseLockTimeoutError, LeaseUnsupportedError
from pipeline.storage.lease.record import LEASE, decode

log = logging.getLogger(__name__)

LOCK = ".lease.lock"  # beside the lease; flocked for the compare-and-swaps
LOCK_WAIT_MAX = 30.0  # s: the longest wait for the lock (min(ttl/2, this))
LOCK_POLL = 0.05  # s between tries of the lock


class LocalBackend:
    def __init__(self, root: str, lock_timeout: float):
        self.root = root
        self.path = os.path.join(root, LEASE)
        self.where = self.path
        self.lock_timeout = lock_timeout  # s: the longest wait for the lock, then an error

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return decode(data), hashlib.md5(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        # No lock needed: link fails when the name exists, and swaps never leave the name absent
        # (only a delete does, and then a fresh create is what should happen).
        os.makedirs(self.root, exist_ok=True)
        try:
            link_new(self.path, data)  # atomic; fails if the name exists: O_EXCL, whole file
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno in NO_HARD_LINKS:
                raise LeaseUnsupportedError(  # FUSE-mounted buckets, some SMB shares
                    f"run lease at {self.path}: the file system has no hard links, which the "
                    "lease's atomic create needs") from e
            raise
        return hashlib.md5(data).hexdigest()

    def swap(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            tmp = write_temp(self.root, LEASE, data)
            os.replace(tmp, self.path)  # readers see the old or the new lease, never a part
        return hashlib.md5(data).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive section for the compare-and-swaps. flock, not a lock *file*: the kernel
        drops it when its holder dies, so nothing stale is left behind. A holder that is stopped
        keeps it: every wait is bounded by `lock_timeout` (LeaseLockTimeoutError)."""
        wait = _LockWait(self, os.path.join(self.root, LOCK))
        # The thread lock first, where flock is emulated by per-process POSIX locks (NFS).
        thread_lock = _thread_lock(self.root)
        while not thread_lock.acquire(timeout=LOCK_POLL):
            wait.tick("another thread of this process")
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(wait.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        wait.tick("another process", fd)
                        time.sleep(LOCK_POLL)
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            thread_lock.release()


class _LockWait:
    """One wait for the lock: one line after a second, LeaseLockTimeoutError at the bound, both
    naming the lock and who holds it."""

    def __init__(self, backend: LocalBackend, lock: str):
        self.backend, self.lock = backend, lock
        self.started = time.monotonic()
        self.said = False

    def tick(self, who: str, fd: int | None = None) -> None:
        waited = time.monotonic() - self.started
        timeout = self.backend.lock_timeout
        if not self.said and waited >= min(1.0, timeout / 2):
            self.said = True
            log.warning("run lease %s: waiting up to %.0f s for its lock %s, held by %s%s",
                        self.backend.path, timeout, self.lock, who, _lock_owner(fd))
        if waited >= timeout:
            raise LeaseLockTimeoutError(
                f"run lease {self.backend.path}: its lock {self.lock} has been held by {who}"
                f"{_lock_owner(fd)} for {waited:.0f} s (a holder or taker stopped inside its "
                "renewal?); end or resume (kill -CONT) that process, then start again")


def _lock_owner(fd: int | None) -> str:
    """' (pid N)' for the process holding a flock on `fd`'s file as /proc/locks tells it;
    '' where it does not (another OS, another host, a pid outside our namespace)."""
    if fd is None:
        return ""
    try:
        st = os.fstat(fd)
        wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2148099 0 EOF"
                fields = line.split()
                if (len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted
                        and fields[4] not in ("0", str(os.getpid()))):
                    return f" (pid {fields[4]})"
    except (OSError, ValueError):
        pass
    return ""


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(root: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(os.path.realpath(root), threading.Lock())
