"""RunLease on a local folder and on a real S3 server (moto_server through s3fs): one holder at a
time, takeover only of dead holders (expired, or the same SLURM job requeued), fencing of a holder
that was taken over, release. Holders that die or pause are real processes (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.storage.lease import (
    LeaseHeldError,
    LeaseLockTimeoutError,
    LeaseStorageError,
    RunLease,
)
from pipeline.storage.lease.backend import backend_for
from pipeline.storage.lease.record import describe, iso
from pipeline.storage.urls import open_url

REPO = Path(__file__).resolve().parents[1]

# A holder in its own process. It acquires, says so, then obeys one line on stdin:
# "check" -> check(), print the outcome, release(); "exit" -> die without releasing.
HOLDER = r"""
import os, sys
from pipeline.storage.lease import LeaseLostError, RunLease
from pipeline.storage.urls import open_url
url, endpoint, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
fs, root = open_url(url, endpoint, single_attempt=True)
lease = RunLease(url, ttl=ttl, fs=fs, root=root)
lease.acquire()
print("acquired", os.getpid(), flush=True)
command = sys.stdin.readline().strip()
if command == "exit":
    os._exit(0)
try:
    lease.check()
    print("check ok", flush=True)
except LeaseLostError as e:
    print("LOST", e, flush=True)
lease.release()
print("released", flush=True)
"""


class Holder:
    """A `python -c HOLDER` process holding the lease of `url`."""

    def __init__(self, url: str, endpoint: str, ttl: float, env: dict[str, str] | None = None,
                 host: str = "", clock_ahead: float = 0.0):
        # host: run on "another machine", a UTS namespace of its own with that hostname, where
        # this machine cannot tell whether the holder's pid is still alive
        other_host = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host]
        # clock_ahead: that machine's wall clock runs this many seconds ahead of ours
        clock = (f"import time; _real = time.time; time.time = lambda: _real() + {clock_ahead}\n"
                 if clock_ahead else "")
        self.proc = subprocess.Popen(
            [*(other_host if host else []), sys.executable, "-c", clock + HOLDER, url, endpoint,
             str(ttl)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("acquired"), line
        self.pid = self.proc.pid

    def command(self, command: str) -> list[str]:
        """Send a command; the lines it printed until it exited."""
        out, _ = self.proc.communicate(command + "\n", timeout=30)
        return out.splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path: Path) -> tuple[str, str]:
    """(checkpoint URL, endpoint URL): a local folder, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "run"), ""
    server = request.getfixturevalue("s3_server")
    return f"{request.getfixturevalue('s3_bucket')}/runs/demo", server


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        if holder.proc.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        holder.kill()


def lease_at(url: str, endpoint: str = "", ttl: float = 60.0) -> RunLease:
    """A RunLease as the trainer makes one: on a client like the checkpoint store's (one try
    per call: the lease's retries are the only ones)."""
    fs, root = open_url(url, endpoint, "checkpoint.url", single_attempt=True)
    return RunLease(url, ttl=ttl, fs=fs, root=root)


@contextlib.contextmanager
def held(lease: RunLease) -> Iterator[RunLease]:
    """`lease` acquired for the block and released after it, as the trainer's teardown does."""
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def stored(url: str, endpoint: str) -> dict | None:
    """The lease record as the storage holds it now."""
    fs, root = open_url(url, endpoint)
    try:
        return json.loads(fs.cat_file(f"{root}/lease.json"))
    except FileNotFoundError:
        return None


def race(make: Callable[[], RunLease], n: int = 6) -> tuple[list[RunLease], list[Exception]]:
    """n leases acquire at the same moment from n threads: (winners, errors of the others)."""
    leases = [make() for _ in range(n)]
    barrier = threading.Barrier(n)
    winners: list[RunLease] = []
    errors: list[Exception] = []

    def go(lease: RunLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, errors


def test_conditional_writes_are_refused_when_the_object_changed(location):
    """The primitives the protocol rests on, on the real filesystem and S3 server: create only if
    absent; swap and delete only if unchanged (moto_server honours If-None-Match and If-Match)."""
    url, endpoint = location
    fs, root = open_url(url, endpoint)
    backend = backend_for(fs, root, url, lock_timeout=30.0)

    def record(n: int) -> bytes:
        return json.dumps({"version": 1, "token": f"t{n}", "renewed": 0.0, "ttl": 60.0,
                           "holder": {"pid": n}}).encode()

    def token() -> str | None:
        current = backend.read()
        return None if current is None else current[0]["token"]

    v1 = backend.create(record(1))
    assert v1 is not None and backend.read()[1] == v1
    assert backend.create(record(2)) is None and token() == "t1"
    v2 = backend.swap(record(2), v1)
    assert v2 is not None and v2 != v1 and token() == "t2"
    assert backend.swap(record(3), v1) is None and token() == "t2"  # a second taker of v1
    assert backend.delete(v1) is False and token() == "t2"
    assert backend.delete(v2) is True and backend.read() is None
    assert backend.create(record(4)) is not None and token() == "t4"


def test_second_acquirer_is_refused_naming_the_holder(location):
    url, endpoint = location
    first = lease_at(url, endpoint)
    first.acquire()
    try:
        record = stored(url, endpoint)
        assert record is not None and record["holder"]["pid"] == os.getpid()
        assert record["holder"]["host"] == socket.gethostname()
        assert record["ttl"] == 60
        with pytest.raises(LeaseHeldError) as refused:
            lease_at(url, endpoint).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "expire in" in message and "checkpoint.url" in message
        first.check()  # the refused attempt changed nothing
    finally:
        first.release()
    assert stored(url, endpoint) is None


def test_concurrent_acquirers_exactly_one_wins(location):
    url, endpoint = location
    winners, errors = race(lambda: lease_at(url, endpoint))
    try:
        assert len(winners) == 1, errors
        assert len(errors) == 5 and all(isinstance(e, LeaseHeldError) for e in errors), errors
        winners[0].check()
    finally:
        for lease in winners:
            lease.release()


def test_killed_holder_on_this_host_is_taken_over_at_once(location, holders):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=60)
    holders.append(holder)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    lease = lease_at(url, endpoint)
    lease.acquire()  # its pid is gone from this host: no need to wait for the expiry
    try:
        assert stored(url, endpoint)["holder"]["pid"] == os.getpid()
    finally:
        lease.release()


def test_killed_holder_elsewhere_is_taken_over_after_expiry_by_one_of_several(location,
                                                                              holders):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=2, host="other-node")
    holders.append(holder)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    with pytest.raises(LeaseHeldError, match=f"pid {holder.pid} on host other-node"):
        lease_at(url, endpoint).acquire()
    record = stored(url, endpoint)
    time.sleep(max(0.0, record["renewed"] + record["ttl"] - time.time()) + 0.2)
    # Expired now: of several takers reading the same dead lease, exactly one takes it over.
    winners, errors = race(lambda: lease_at(url, endpoint))
    try:
        assert len(winners) == 1, errors
        assert all(isinstance(e, LeaseHeldError) for e in errors), errors
        assert str(holder.pid) not in "".join(map(str, errors))  # they name the new holder
        winners[0].check()
    finally:
        for lease in winners:
            lease.release()


# A process that, at the same wall-clock moments as its rivals, tries each folder's lease once.
RACER = r"""
import sys, time
from pipeline.storage.lease import LeaseHeldError, RunLease
from pipeline.storage.urls import open_url
start, folders = float(sys.argv[1]), sys.argv[2:]
for i, folder in enumerate(folders):
    time.sleep(max(0.0, start + 0.05 * i - time.time()))
    try:
        RunLease(folder, ttl=60, fs=open_url(folder)[0], root=folder).acquire()
        print(i, flush=True)
    except LeaseHeldError:
        pass
print("done", flush=True)
sys.stdin.read()  # hold every lease won until all racers are done: a holder that has exited is
                  # provably gone, and a late racer would rightly take its lease over
"""


def test_processes_taking_over_expired_local_leases_exactly_one_wins_each(tmp_path):
    """Takeover across processes (flock, not the in-process lock): 6 processes race for each of
    30 expired leases; every lease gets exactly one new holder."""
    folders = []
    for i in range(30):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        dead = {"version": 1, "token": "dead", "renewed": time.time() - 100, "ttl": 10,
                "holder": {"host": "gone", "pid": 1, "slurm_job_id": "", "started": "then"}}
        (folder / "lease.json").write_text(json.dumps(dead))
        folders.append(str(folder))
    start = time.time() + 3  # after every process has started and imported
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(start), *folders], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    wins = []
    stuck = threading.Timer(60, lambda: [proc.kill() for proc in procs])  # ends the reads below
    stuck.start()
    try:
        for proc in procs:
            for line in proc.stdout:  # until the racer is done; it still holds its leases
                if line.strip() == "done":
                    break
                wins.append(int(line))
    finally:
        stuck.cancel()
        for proc in procs:
            proc.stdin.close()
        returncodes = [proc.wait(timeout=60) for proc in procs]
    assert returncodes == [0] * 6  # -9: a racer was still running after 60 s
    assert sorted(wins) == list(range(30))


def test_requeued_slurm_job_takes_over_at_once_and_fences_the_old_process(
        location, holders, monkeypatch):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=60,
                    env={"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "0"})
    holders.append(holder)
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    with pytest.raises(LeaseHeldError, match="SLURM job 123 .restart 0."):
        lease_at(url, endpoint).acquire()
    # Same job and restart, its process alive on this host: two trainers in one allocation.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LeaseHeldError):
        lease_at(url, endpoint).acquire()
    # Requeued: SLURM has ended restart 0 (here it still runs, to show that it gets fenced).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    new = lease_at(url, endpoint)
    new.acquire()  # long before the old lease's expiry
    try:
        assert stored(url, endpoint)["holder"]["slurm_restart_count"] == 1
        # The old holder's heartbeat (every 15 s) has not run: its check() reads the lease.
        out = holder.command("check")
        assert out[0].startswith("LOST fenced: ") and f"pid {os.getpid()} " in out[0], out
        assert out[1] == "released"
        new.check()  # the fenced holder's release left the new lease alone
    finally:
        new.release()


def test_requeued_slurm_job_on_same_host_takes_over_from_an_exited_process(
        location, holders, monkeypatch):
    url, endpoint = location
    env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "7"}
    holder = Holder(url, endpoint, ttl=60, env=env)
    holders.append(holder)
    assert holder.command("exit") == []  # gone without releasing
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with held(lease_at(url, endpoint)) as lease:
        assert stored(url, endpoint)["holder"]["slurm_job_id"] == "70_7"
        lease.check()


def test_paused_holder_is_fenced_after_takeover(location, holders):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=2)
    holders.append(holder)
    os.kill(holder.pid, signal.SIGSTOP)  # alive but silent: no heartbeat
    taker = lease_at(url, endpoint)
    refused = 0
    deadline = time.time() + 20
    while True:
        try:
            taker.acquire()
            break
        except LeaseHeldError:
            refused += 1
            assert time.time() < deadline
            time.sleep(0.25)
    try:
        assert refused > 0  # not before its expiry
        os.kill(holder.pid, signal.SIGCONT)
        out = holder.command("check")
        assert out[0].startswith("LOST fenced: ") and f"pid {os.getpid()} " in out[0], out
        assert out[1] == "released"
        taker.check()
    finally:
        taker.release()


def test_heartbeat_keeps_the_lease_past_its_ttl(location):
    url, endpoint = location
    with held(lease_at(url, endpoint, ttl=1)) as lease:
        first = stored(url, endpoint)["renewed"]
        time.sleep(2.5)
        with pytest.raises(LeaseHeldError):
            lease_at(url, endpoint).acquire()
        assert stored(url, endpoint)["renewed"] > first
        lease.check()


def test_release_lets_the_next_in_at_once_and_is_idempotent(location):
    url, endpoint = location
    first = lease_at(url, endpoint)
    first.acquire()
    first.release()
    second = lease_at(url, endpoint)
    second.acquire()
    try:
        first.release()  # again: must not delete the second holder's lease
        second.check()
        with pytest.raises(RuntimeError):
            first.check()
        with pytest.raises(LeaseHeldError):
            first.acquire()
    finally:
        second.release()
        second.release()
    assert stored(url, endpoint) is None


def test_an_outage_longer_than_the_ttl_refuses_writes_until_the_lease_is_confirmed(
        s3_bucket, s3_proxy):
    """Storage unreachable past the ttl: writes are refused (a failed save, not a lost lease);
    once it is back and nobody took over, the compare-and-swap renewal proves the lease ours."""
    url = f"{s3_bucket}/runs/cut"
    lease = lease_at(url, s3_proxy.endpoint, ttl=2)
    lease.acquire()
    s3_proxy.stop()
    deadline = time.time() + 30
    while True:
        try:
            lease.check()  # a read failure inside the ttl is tolerated
        except LeaseStorageError as e:
            assert "not writing until it is confirmed ours" in str(e) and "\n" not in str(e)
            break
        assert time.time() < deadline
        time.sleep(0.25)
    s3_proxy.start()
    deadline = time.time() + 30
    while True:  # the next heartbeats reach the storage again
        try:
            lease.check()
            break
        except LeaseStorageError:
            assert time.time() < deadline
            time.sleep(0.25)
    assert stored(url, s3_proxy.endpoint)["holder"]["pid"] == os.getpid()  # renewed, not retaken
    lease.release()
    assert stored(url, s3_proxy.endpoint) is None


def test_a_foreign_lease_object_is_refused_in_one_line(tmp_path):
    """The location's content is untrusted: a lease.json of another shape names itself and the
    fix instead of a KeyError deep in the takeover rules."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text('{"version": 1, "token": 5}')
    with pytest.raises(UserError, match="is not a lease this version writes") as refused:
        lease_at(str(tmp_path / "run"), ttl=5).acquire()
    assert "\n" not in str(refused.value).strip()


# -- records that clocks cannot judge (issue 22, item 3) ---------------------------------------

FOREIGN = {"host": "other-node", "pid": 4242, "pid_namespace": "4026531836",
           "boot_id": "another-machine", "slurm_job_id": "55", "slurm_restart_count": 0,
           "ray_job_id": "", "started": "2024-05-01T00:00:00+00:00"}


def write_lease(url: str, endpoint: str, *, renewed: object, ttl: object = 60.0,
                **holder: object) -> bytes:
    """Put a lease.json of a holder on another host as it is, NaN and all; its bytes."""
    data = json.dumps({"version": 1, "token": "theirs", "renewed": renewed, "ttl": ttl,
                       "holder": {**FOREIGN, **holder}}).encode()
    fs, root = open_url(url, endpoint)
    if not endpoint:
        os.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/lease.json", data)
    return data


def one_line(text: str) -> str:
    assert text and "\n" not in text.strip(), text
    return text


@pytest.mark.parametrize("field, value, named", [
    ("renewed", math.nan, "renewed is NaN, not a finite number"),
    ("renewed", math.inf, "renewed is Infinity, not a finite number"),
    ("renewed", True, "renewed is true, not a finite number"),
    ("ttl", -1, "ttl is -1, not a positive number"),
    ("ttl", 0.0, "ttl is 0.0, not a positive number"),
    ("slurm_restart_count", "0", 'holder.slurm_restart_count is "0", not a whole number'),
    ("pid", 2**70, "holder.pid is 1180591620717411303424, not a process id"),
])
def test_a_record_the_rules_cannot_use_is_refused_in_one_line(tmp_path, monkeypatch, field,
                                                              value, named):
    """Every field the takeover rules compute with is checked: the same SLURM job requeued (its
    rule compares restart counts) gets one line naming the field, never a traceback or a
    takeover by arithmetic on nonsense; the file is left as it was."""
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    url = str(tmp_path / "run")
    data = write_lease(url, "", **{"renewed": time.time(), field: value})
    with pytest.raises(UserError) as refused:
        lease_at(url, ttl=60).acquire()
    assert type(refused.value) is UserError
    message = one_line(str(refused.value))
    assert f"{url}/lease.json is not a lease this version writes ({named}" in message
    assert message.endswith("delete it if no job is running")
    assert (tmp_path / "run" / "lease.json").read_bytes() == data


def test_a_ttl_beyond_an_hour_counts_as_an_hour(tmp_path):
    url = str(tmp_path / "run")
    write_lease(url, "", renewed=time.time(), ttl=1e12)
    with pytest.raises(LeaseHeldError) as refused:
        lease_at(url, ttl=60).acquire()
    message = one_line(str(refused.value))
    assert "wait for its lease to expire in 3600 s" in message, message
    assert "its ttl 1e+12 s counted as 3600 s" in message
    write_lease(url, "", renewed=time.time() - 3601, ttl=1e12)  # an hour without a heartbeat
    with held(lease_at(url, ttl=60)) as lease:
        lease.check()
    for ttl in ("1e12", "3601", ".nan", ".inf", "0", "-1"):  # nor does this version write one
        with pytest.raises(UserError, match=r"checkpoint.lease_ttl.* in \(0, 3600\]"):
            load_config(str(REPO / "tests" / "empty_config.yaml"), [f"checkpoint.lease_ttl={ttl}"])


def test_times_that_are_no_dates_are_described_in_one_line():
    for t in (1e12, 1e300, -1e300, math.nan, math.inf, -math.inf):
        assert isinstance(iso(t), str)
    for renewed in (1e12, 1e300, -1e300, time.time() + 30, 0.0):
        record = {"token": "t", "renewed": renewed, "ttl": 60.0, "holder": FOREIGN}
        one_line(describe(record))
    ahead = describe({"token": "t", "renewed": 1e12, "ttl": 60.0,
                      "holder": {**FOREIGN, "host": "evil\nhost"}})
    assert "ahead of this host's clock" in one_line(ahead) and "expires" not in ahead


@pytest.mark.parametrize("renewed", ["a day ahead", "1e12"])
def test_a_lease_dated_ahead_that_nobody_renews_is_taken_over_after_one_ttl(location, caplog,
                                                                            renewed):
    """Another host's clock a day ahead (or a bogus 1e12) and a dead holder: clocks cannot
    judge it, so it is watched for one ttl; unchanged, it is taken over, in a few lines."""
    url, endpoint = location
    write_lease(url, endpoint, ttl=1.0,
                renewed=time.time() + 86400 if renewed == "a day ahead" else 1e12)
    caplog.set_level(logging.WARNING, logger="pipeline.storage.lease")
    with held(lease_at(url, endpoint, ttl=1)) as lease:
        lease.check()
        assert stored(url, endpoint)["holder"]["pid"] == os.getpid()
    lines = [one_line(r.getMessage()) for r in caplog.records]
    assert any("ahead of this host's clock: its expiry cannot be judged by clocks; watching it "
               "for 1 s, taken over unless its holder renews it" in line for line in lines), lines
    assert any("taking over from pid 4242 on host other-node" in line
               and "its holder did not renew it in 1 s" in line for line in lines), lines


def test_a_lease_dated_ahead_that_its_holder_renews_is_refused_in_one_line(location, holders):
    """A live holder whose clock runs a day ahead renews its lease while the taker watches: it
    is refused in one line naming the clock difference and the fix, and the holder keeps it."""
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=1, host="other-node", clock_ahead=86400)
    holders.append(holder)
    with pytest.raises(LeaseHeldError) as refused:
        lease_at(url, endpoint, ttl=1).acquire()
    message = one_line(str(refused.value))
    assert f"held by pid {holder.pid} on host other-node" in message, message
    # a day ahead, less the age of the renewal it read (up to a beat, ttl/4, or more when busy)
    assert re.search(r"it renewed the lease while this process watched it, so its clock is about "
                     r"86(399|400) s ahead", message), message
    assert "s ahead of this host's; fix that host's clock (NTP) or stop that job" in message
    assert stored(url, endpoint)["holder"]["host"] == "other-node"
    assert holder.command("check") == ["check ok", "released"]


# -- waits on the local lock (issue 22, item 4) ------------------------------------------------

# Takes the flock of a local lease's lock, says so, and stops itself while holding it: a holder
# stopped (SIGSTOP, a frozen VM) inside its flock-guarded renewal.
LOCKER = r"""
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.fixture
def stopped_lock_holder() -> Iterator[Callable[[Path], subprocess.Popen]]:
    started: list[subprocess.Popen] = []

    def start(root: Path) -> subprocess.Popen:
        root.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(root / ".lease.lock")],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "locked\n"
        return proc

    yield start
    for proc in started:
        proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()


def test_a_taker_blocked_by_a_stopped_lock_holder_gives_up_in_one_line(
        tmp_path, stopped_lock_holder, caplog):
    root = tmp_path / "run"
    url = str(root)
    write_lease(url, "", renewed=time.time() - 100, ttl=10.0)  # expired: to be taken over
    before = (root / "lease.json").read_bytes()
    proc = stopped_lock_holder(root)
    caplog.set_level(logging.WARNING, logger="pipeline.storage.lease")
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            lease_at(url, ttl=2).acquire()  # waits for the lock at most min(ttl/2, 30 s)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(timeout=30)  # today's main waits as long as the holder stays stopped
    assert not taker.is_alive(), "the taker still waits for the lock"
    error = outcome[0]
    assert isinstance(error, LeaseLockTimeoutError), error
    assert isinstance(error, LeaseHeldError)  # refused like a held lease; not retried
    message = one_line(str(error))
    assert re.fullmatch(re.escape(
        f"run lease {url}/lease.json: its lock {url}/.lease.lock has been held by another "
        f"process (pid {proc.pid}) for ") + r"\d+" + re.escape(
        " s (a holder or taker stopped inside its renewal?); end or resume (kill -CONT) that "
        "process, then start again"), message), message  # about 1 s: rounded on a busy host
    lines = [one_line(r.getMessage()) for r in caplog.records]
    assert "taking over from pid 4242 on host other-node" in lines[-2], lines
    assert lines[-1] == (
        f"run lease {url}/lease.json: waiting up to 1 s for its lock {url}/.lease.lock, held by "
        f"another process (pid {proc.pid})"), lines
    assert (root / "lease.json").read_bytes() == before


def test_a_renewal_blocked_by_a_stopped_lock_holder_fails_and_is_retried(
        tmp_path, stopped_lock_holder, caplog):
    """The heartbeat's renewal does not hang on the lock either: it fails in a logged line, and
    the next beat renews once the lock is free."""
    url = str(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="pipeline.storage.lease")
    lease = lease_at(url, ttl=2)
    lease.acquire()
    try:
        proc = stopped_lock_holder(tmp_path / "run")

        def failed() -> list[str]:
            return [r.getMessage() for r in caplog.records if "renewal failed" in r.getMessage()]

        try:
            wait_until(lambda: bool(failed()), "failed renewal", timeout=20)
            assert "renewal failed (LeaseLockTimeoutError: run lease " in failed()[0]
            assert re.search(rf"held by another process \(pid {proc.pid}\) for \d+ s",
                             one_line(failed()[0]))
            renewed = stored(url, "")["renewed"]
        finally:
            proc.kill()  # the kernel drops its flock
            proc.wait()
        wait_until(lambda: stored(url, "")["renewed"] > renewed, "renewal after the lock freed",
                   timeout=20)
        lease.check()
    finally:
        lease.release()
    assert stored(url, "") is None
