"""RunLease: one writer per run, enforced by a small lease object in the checkpoint location.

Two trainers started on the same run would both write `step-<n>/` and overwrite each other. The
writer therefore holds a lease, one JSON object `<checkpoint url>/lease.json`:

    {"version": 1, "token": "<uuid4 of this acquisition>", "renewed": <wall time, s>,
     "ttl": <s>, "holder": {"host", "pid", "slurm_job_id", "slurm_restart_count",
                            "ray_job_id", "started": "<UTC ISO time>"}}

(CheckpointStore lists only `step-*` folders, so the lease beside them is invisible to it.)

    lease = RunLease("s3://bucket/runs/demo", ttl=120, endpoint_url=...)   # or fs=, root=
    lease.acquire()          # LeaseHeldError (one line naming the holder) when someone holds it
    ...
    lease.check()            # before every checkpoint write: LeaseLostError once fenced
    store.save(step, state)
    ...
    lease.release()          # or `with RunLease(...) as lease:`

Protocol
- acquire: create the object only if absent. If it exists it is taken over only when it expired
  (renewed + ttl < now), or its holder is provably gone: a process of this machine (same boot
  id, host and pid namespace) that no longer exists; the same SLURM job requeued (same job id,
  a higher SLURM_RESTART_COUNT: SLURM ends a job before requeueing it). Anything else,
  including a Ray worker group restarted on another node, waits for the expiry:
  LeaseHeldError.
- heartbeat: a daemon thread rewrites `renewed` every ttl/4, conditionally on the object still
  being the one this process last wrote, also past our expiry after an outage. When it is not
  (someone took over after we expired), the lease is LOST. While storage cannot be reached
  past our expiry, check() refuses each write (LeaseStorageError) until a renewal succeeds.
  A renewal is one try (the checkpoint store's S3 client does not retry underneath): one that
  fails is logged and tried again at the next beat, three more before the lease expires.
- check(): raises LeaseLostError when the heartbeat found the lease lost, and re-reads the object
  (one GET) so that a writer never writes after another holder's takeover became visible.
- release(): stops the heartbeat and deletes the object only if it is still ours.

What is atomic where
- S3 (s3fs): create is a PUT with `If-None-Match: *`; takeover and renewal are PUTs with
  `If-Match: <ETag we read / last wrote>`; release is a DELETE with `If-Match`. Of several
  concurrent creators or takers exactly one PUT succeeds, the others get 412 (or 409
  ConditionalRequestConflict on AWS) and re-read. AWS S3 has honoured these headers since
  2024 (conditional DELETE since late 2024); moto's server honours all three. A server that
  ignores them would overwrite silently: after every create or takeover the object is read back
  and must hold our token, which catches most of that (not an interleaving of two read-backs).
- Local paths: create writes a temporary file and `os.link`s it into place (fails if the name
  exists, like O_EXCL; readers never see a half-written lease). Takeover, renewal and release are
  compare-and-swaps (read, compare with what we read or last wrote, then temp file + `os.replace`
  or unlink) inside an exclusive `flock` of `<root>/.lease.lock`, which the kernel drops when
  its holder dies, but not while it is stopped (SIGSTOP, a frozen VM). Every wait for it (and
  for the per-process thread lock before it) is bounded: it polls every 50 ms for at most
  min(ttl/2, LOCK_WAIT_MAX = 30 s), logs one line after 1 s naming the lock and its holder's
  pid (from /proc/locks), then raises LeaseLockTimeoutError, a LeaseHeldError (one line, not
  retried). In the heartbeat that is a failed renewal: logged, tried again at the next beat.
  They never leave the name absent, so fresh creators cannot slip in. The flock
  excludes processes on one host, and across hosts on NFSv4, GPFS and Lustre mounted with
  `flock` (not `localflock`). (Renaming the stale lease to a unique name and re-creating, the
  lock-free alternative, was tried: a taker that read the lease before another taker replaced it
  moves the *new* lease away, and a third acquirer sees the name absent; 6 racing takers gave two
  winners in about 5% of rounds.)

Clock assumption: expiry compares wall clocks (time.time()) of different hosts, so the hosts'
clocks must agree to within a small fraction of the ttl (NTP gives milliseconds; ttl is minutes).
A clock behind by more than the ttl makes its live holder look expired: it is taken over, then
fenced. A clock far ahead, and records no clock can judge, follow these rules:
- Every field the rules use is checked when the record is read: `renewed` and `ttl` finite
  numbers (not booleans), ttl > 0; the holder's pid a positive integer, its
  slurm_restart_count a non-negative integer, its host, boot_id, pid_namespace, slurm_job_id,
  ray_job_id and started strings. Anything else is not a lease this version writes: acquire
  refuses it in one line naming the field (delete it if no job is running).
- A ttl longer than MAX_TTL (3600 s) counts as MAX_TTL when its expiry is judged, and RunLease
  accepts no longer one, so no record makes anyone wait more than an hour for its expiry.
- A record dated ahead of this host's clock by more than its ttl (its host's clock far ahead,
  or a bogus value such as 1e12) is judged by whether it changes, not by clocks: acquire
  watches it, re-reading it about once a second, for one ttl (the longer of ours and its own,
  at most MAX_TTL) and logs one line saying so. Unchanged: its holder is not renewing, and it
  is taken over with a warning naming why. Renewed meanwhile: a live holder whose clock is
  wrong; LeaseHeldError names the difference and the fix (that host's clock: NTP, or stop
  that job). Gone or replaced by a record dated by a sane clock: judged again as usual.

Fencing is as good as storage allows: the checkpoint store asks check() before it moves anything
and again right before it commits a checkpoint's manifest, so the window is one GET to that PUT;
a writer paused exactly inside it (SIGSTOP, a long GC pause) past its expiry can still commit
once: at most the one checkpoint it was about to save.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import fsspec
import fsspec.asyn

from pipeline.errors import UserError
from pipeline.storage.atomic import (
    NO_HARD_LINKS,
    is_local,
    link_new,
    lost_race,
    protocols,
    write_temp,
)
from pipeline.storage.manifest import is_int, shown
from pipeline.storage.retry import StorageError, retry_storage
from pipeline.storage.urls import open_url

log = logging.getLogger(__name__)

LEASE = "lease.json"
LOCK = ".lease.lock"  # beside it; flocked for the compare-and-swaps of a local lease
FORMAT_VERSION = 1
MAX_TTL = 3600.0  # s: the longest ttl RunLease accepts, and that a record's expiry is judged by
LOCK_WAIT_MAX = 30.0  # s: the longest wait for the local lock (min(ttl/2, this))
LOCK_POLL = 0.05  # s between tries of the local lock
T = TypeVar("T")


class LeaseHeldError(UserError):
    """Another live process holds the run's lease; the one-line message names it and the fix."""


class LeaseLockTimeoutError(LeaseHeldError):
    """The local lease's lock stayed held past its bound: a process holding it is stopped (or
    hung) inside a compare-and-swap. One line naming the lock, its holder's pid and the fix."""


class LeaseUnsupportedError(UserError):
    """The storage has no atomic create-if-absent that the lease can use."""


class LeaseLostError(UserError):
    """This process's lease was taken over (it was fenced): it must stop writing checkpoints."""


class LeaseStorageError(StorageError):
    """The lease object could not be read or written after every retry."""


def holder_identity(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Who this process is, as stored in the lease: host, pid, SLURM and Ray job, start time."""
    env = dict(os.environ) if env is None else env
    slurm_job = env.get("SLURM_JOB_ID", "")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # An array task's own SLURM_JOB_ID is unique too, but users know it as JOB_TASK.
        slurm_job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "boot_id": _boot_id(),
        "slurm_job_id": slurm_job,
        "slurm_restart_count": _restart_count(env.get("SLURM_RESTART_COUNT", "")),
        "ray_job_id": env.get("RAY_JOB_ID", "") or _ray_job_id(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _restart_count(text: str) -> int:
    # SLURM sets a count; anything else counts as 0, which never takes over on its own.
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def _ray_job_id() -> str:
    # Only when this process already runs Ray: importing ray just to ask would cost seconds.
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except Exception:  # an old or partial Ray: the id is only informative
        pass
    return ""


def _boot_id() -> str:
    # Host names and the initial pid namespace's inode repeat across machines; the kernel's
    # boot id does not.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    # Containers on one machine may share a hostname; a pid is only meaningful in its namespace.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _iso(t: float) -> str:
    """A wall time as UTC ISO text; any number, also one that is no date (1e300, NaN)."""
    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
            timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{_seconds(t)} after 1970 (not a date)"


def _seconds(s: float) -> str:
    """A span as `86400 s`; `1e+12 s` where whole digits would fill a line."""
    return f"{s:.0f} s" if abs(s) < 1e9 else f"{s:.3g} s"


def _ttl(record: dict[str, Any]) -> float:
    """The ttl the record's expiry is judged by: its own, at most MAX_TTL."""
    return min(float(record["ttl"]), MAX_TTL)


def _expires(record: dict[str, Any]) -> float:
    return record["renewed"] + _ttl(record)


def _ahead(record: dict[str, Any], now: float) -> float:
    """How far the record's `renewed` lies ahead of `now`, when that is more than its ttl
    (then its expiry cannot be judged by clocks, see the module docstring); else 0."""
    ahead = record["renewed"] - now
    return ahead if ahead > _ttl(record) else 0.0


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """One line naming a holder; given a whole lease record, also its heartbeat and expiry."""
    record = holder if "holder" in holder else None
    who = record["holder"] if record is not None else holder
    jobs = []
    if who.get("slurm_job_id"):
        jobs.append(f"SLURM job {who['slurm_job_id']} "
                    f"(restart {who.get('slurm_restart_count', 0)})")
    if who.get("ray_job_id"):
        jobs.append(f"Ray job {who['ray_job_id']}")
    text = f"pid {who.get('pid')} on host {who.get('host')}"
    if jobs:
        text += ", " + ", ".join(jobs)
    text += f", since {who.get('started')}"
    text = text.replace("\r", "\\r").replace("\n", "\\n")  # the record is not ours to trust
    if record is not None:
        now = time.time() if now is None else now
        ahead = _ahead(record, now)
        if ahead:  # no expiry to promise: see the module docstring
            return text + f", last heartbeat dated {_seconds(ahead)} ahead of this host's clock"
        age, expires = now - record["renewed"], _expires(record)
        text += (f", last heartbeat {_seconds(age)} ago" if age >= 0 else
                 f", last heartbeat dated {_seconds(-age)} ahead of this host's clock")
        text += f", expires at {_iso(expires)} (in {_seconds(max(0.0, expires - now))})"
        if record["ttl"] > MAX_TTL:
            text += f" (its ttl {_seconds(record['ttl'])} counted as {_seconds(MAX_TTL)})"
    return text


class _Backend(Protocol):
    """Conditional operations on the one lease object. A version identifies one write of it
    (S3: the ETag; local: the md5 of its bytes, which differ per write: token and time)."""

    where: str

    def read(self) -> tuple[dict[str, Any], str] | None: ...

    def create(self, data: bytes) -> str | None:
        """Write only if absent; the new version, None if it exists."""

    def take_over(self, data: bytes, version: str) -> str | None:
        """Replace the object only if it is still `version`; the new version, else None."""

    def renew(self, data: bytes, version: str) -> str | None:
        """The same compare-and-swap as take_over, by the holder."""

    def delete(self, version: str) -> bool:
        """Delete only if it is still `version`; False if it is not."""


def _decode(data: bytes) -> dict[str, Any]:
    """The lease record in `data`; ValueError naming the field unless every field the rules use
    has the type and range `_record` writes (the location's content is not trusted to be ours)."""
    try:
        record = json.loads(data)
    except RecursionError as e:
        raise ValueError(f"not a lease record: nested too deeply: {data[:200]!r}") from e
    version = record.get("version") if isinstance(record, dict) else None
    if not is_int(version) or version != FORMAT_VERSION:
        raise ValueError(f"not a version-{FORMAT_VERSION} lease: {data[:200]!r}")
    if not isinstance(record.get("token"), str) or not isinstance(record.get("holder"), dict):
        raise ValueError(f"not a lease record (token, holder, renewed, ttl): {data[:200]!r}")
    for name in ("renewed", "ttl"):
        if not _is_finite(record.get(name)):
            raise ValueError(f"{name} is {shown(record.get(name))}, not a finite number of "
                             "seconds")
    if record["ttl"] <= 0:
        raise ValueError(f"ttl is {shown(record['ttl'])}, not a positive number of seconds")
    holder = record["holder"]
    if "pid" in holder and not (is_int(holder["pid"]) and 0 < holder["pid"] < 2**31):
        raise ValueError(f"holder.pid is {shown(holder['pid'])}, not a process id")
    count = holder.get("slurm_restart_count", 0)
    if not (is_int(count) and count >= 0):
        raise ValueError(f"holder.slurm_restart_count is {shown(count)}, not a whole number "
                         ">= 0")
    for name in ("host", "boot_id", "pid_namespace", "slurm_job_id", "ray_job_id", "started"):
        if not isinstance(holder.get(name, ""), str):
            raise ValueError(f"holder.{name} is {shown(holder[name])}, not a string")
    return record


def _is_finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


class _LocalBackend:
    def __init__(self, root: str, lock_timeout: float = LOCK_WAIT_MAX):
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
        return _decode(data), hashlib.md5(data).hexdigest()

    def _write_temp(self, data: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        return write_temp(self.root, LEASE, data)

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

    def create(self, data: bytes) -> str | None:
        # No lock needed: link fails when the name exists, and the swaps below never leave the
        # name absent (only a delete does, and then a fresh create is what should happen).
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

    def take_over(self, data: bytes, version: str) -> str | None:
        return self.renew(data, version)

    def renew(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            tmp = self._write_temp(data)
            os.replace(tmp, self.path)  # readers see the old or the new lease, never a part
        return hashlib.md5(data).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
        return True


class _LockWait:
    """One wait for the local lock: one line after a second, LeaseLockTimeoutError at the
    bound, both naming the lock and who holds it."""

    def __init__(self, backend: _LocalBackend, lock: str):
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


class _S3Backend:
    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.bucket, key, _ = fs.split_path(f"{root}/{LEASE}")
        self.key = key
        self.where = f"s3://{self.bucket}/{key}"

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self) -> tuple[dict[str, Any], str] | None:
        async def get() -> tuple[bytes, str]:
            # Body and ETag from one GET, so the version always belongs to the bytes.
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            data, etag = fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _decode(data), etag

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self._call("put_object", Body=data, **condition)["ETag"]
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            return None
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            return None
        except OSError as e:
            if lost_race(e):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def take_over(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def renew(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            if lost_race(e):
                return False
            raise
        return True


class RunLease:
    """The lease of one checkpoint location; see the module docstring for the protocol."""

    def __init__(self, url: str, *, ttl: float = 120.0, endpoint_url: str = "", fs: Any = None,
                 root: str | None = None):
        if not (_is_finite(ttl) and 0 < ttl <= MAX_TTL):
            raise UserError(f"lease ttl (checkpoint.lease_ttl) must be a number of seconds in "
                            f"(0, {MAX_TTL:.0f}], got {ttl}")
        self.url = url.rstrip("/")
        self.ttl = float(ttl)
        if fs is None or root is None:
            fs, root = open_url(self.url, endpoint_url, "checkpoint.url")
        root = root.rstrip("/")
        self._backend: _Backend
        if is_local(fs):
            self._backend = _LocalBackend(root, min(self.ttl / 2, LOCK_WAIT_MAX))
        elif "s3" in protocols(fs):
            self._backend = _S3Backend(fs, root)
        else:
            # Other stores need their own conditional writes (gcsfs: if_generation_match).
            raise LeaseUnsupportedError(
                f"run lease at {self.url!r}: only local paths and s3:// support the "
                "atomic create the lease needs; use one of those for checkpoint.url")
        self._holder = holder_identity()
        self._lock = threading.Lock()  # guards the state below between caller and heartbeat
        self._token = ""
        self._version = ""
        self._renewed = 0.0
        self._lost = ""  # why the lease was lost; "" while held or never acquired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def holder(self) -> dict[str, Any]:
        """This process's identity as written into the lease."""
        return dict(self._holder)

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
                record = self._record(token, now)
                version = self._retry(lambda r=record: self._backend.create(r), "create")
            else:
                old, old_version = current
                if old["token"] == token:  # our write did land (a retried request, say)
                    version = old_version
                else:
                    reason = self._takeover_reason(old, now)
                    if reason is None and _ahead(old, now):
                        reason = self._watch(old, old_version)
                        if reason is None:
                            continue  # released, or renewed by a sane clock: judge it again
                        now = time.time()  # our lease starts now, not before the watch
                    if reason is None:
                        raise LeaseHeldError(self._held_message(old, now))
                    log.warning("run lease %s: taking over from %s: %s", self._backend.where,
                                describe(old, now), reason)
                    record = self._record(token, now)
                    version = self._retry(
                        lambda r=record, v=old_version: self._backend.take_over(r, v),
                        "take over")
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
                expires = self._renewed + self.ttl
            if time.time() < expires:
                log.warning("run lease %s: cannot read it (%s: %s); still ours by our clock for "
                            "%.0f s", self._backend.where, type(e).__name__, e,
                            expires - time.time())
                return
            # Not lost for good: the next renewal tells. This one write is refused (a failed
            # save, counted like any other) since another process may hold the lease now.
            raise LeaseStorageError(
                f"run lease {self._backend.where} could not be read ({type(e).__name__}: {e}) "
                f"and expired by our clock at {_iso(expires)}: not writing until it is "
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

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------

    def _record(self, token: str, now: float) -> bytes:
        return json.dumps({"version": FORMAT_VERSION, "token": token, "renewed": now,
                           "ttl": self.ttl, "holder": self._holder}, indent=1).encode()

    def _takeover_reason(self, old: dict[str, Any], now: float) -> str | None:
        """Why the lease `old` may be taken over now, or None when its holder may be alive."""
        expires = _expires(old)
        if now > expires:
            counted = (f" (its ttl {_seconds(old['ttl'])} counted as {_seconds(MAX_TTL)})"
                       if old["ttl"] > MAX_TTL else "")
            return f"it expired {now - expires:.1f} s ago{counted}"
        theirs, mine = old["holder"], self._holder
        # A process of this machine (same boot, same pid namespace) that is gone cannot write
        # any more: a job that was SIGKILLed or crashed, then started again here, goes on at
        # once. (Ray job ids are not used: they are counters that repeat across clusters.)
        if (mine["boot_id"] and theirs.get("boot_id") == mine["boot_id"]
                and theirs.get("host") == mine["host"]
                and theirs.get("pid_namespace", "") == mine["pid_namespace"]
                and theirs.get("pid") != mine["pid"]
                and "pid" in theirs and not _pid_alive(theirs["pid"])):
            return f"its process {theirs.get('pid')} on this host has exited"
        # SLURM stops every task of a job before requeueing it: a higher restart count of the
        # same job means the old writer is gone. (The same restart count proves nothing: two
        # trainers in one salloc share the job id and may both be alive.)
        if (theirs.get("slurm_job_id") and theirs["slurm_job_id"] == mine["slurm_job_id"]
                and mine["slurm_restart_count"] > theirs.get("slurm_restart_count", 0)):
            return (f"SLURM job {mine['slurm_job_id']} was requeued (restart "
                    f"{theirs.get('slurm_restart_count', 0)} -> {mine['slurm_restart_count']})")
        return None

    def _watch(self, old: dict[str, Any], version: str) -> str | None:
        """Judge a lease dated ahead of our clock by whether it changes (module docstring): the
        takeover reason when it stayed unchanged for a ttl; LeaseHeldError when its holder
        renewed it; None when it went away or now bears a time that clocks can judge."""
        span = max(self.ttl, _ttl(old))
        log.warning("run lease %s is held by %s: its expiry cannot be judged by clocks; "
                    "watching it for %.0f s, taken over unless its holder renews it",
                    self._backend.where, describe(old), span)
        deadline = time.monotonic() + span
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(1.0, span / 8, left))
            current = self._retry(self._backend.read, "read")
            if current is not None and current[1] == version:
                continue
            if current is None or not _ahead(current[0], time.time()):
                return None
            raise LeaseHeldError(
                f"run lease {self._backend.where} is held by {describe(current[0])}: it renewed "
                f"the lease while this process watched it, so its clock is about "
                f"{_seconds(current[0]['renewed'] - time.time())} ahead of this host's; fix "
                "that host's clock (NTP) or stop that job, or use another name=/checkpoint.url")
        return (f"it is dated {_seconds(old['renewed'] - time.time())} ahead of this host's "
                f"clock and its holder did not renew it in {span:.0f} s")

    def _held_message(self, old: dict[str, Any], now: float) -> str:
        if _ahead(old, now):  # its holder renewed it meanwhile, or a racing taker's clock
            wait = "fix that host's clock (NTP)"
        else:
            wait = (f"wait for its lease to expire in "
                    f"{_seconds(max(0.0, _expires(old) - now))}")
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
        record = self._record(token, now)
        try:
            new_version = self._backend.renew(record, version)
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
                        self.ttl / 4, _iso(renewed + self.ttl))
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
