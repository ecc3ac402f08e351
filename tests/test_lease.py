"""RunLease on a local folder and on a real S3 server (moto_server through s3fs): one holder at a
time, takeover only of dead holders (expired, or the same SLURM job requeued), fencing of a holder
that was taken over, release. Holders that die or pause are real processes (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from pipeline.errors import UserError
from pipeline.storage.lease import LeaseHeldError, LeaseStorageError, RunLease

REPO = Path(__file__).resolve().parents[1]

# A holder in its own process. It acquires, says so, then obeys one line on stdin:
# "check" -> check(), print the outcome, release(); "exit" -> die without releasing.
HOLDER = r"""
import os, sys
from pipeline.storage.lease import LeaseLostError, RunLease
url, endpoint, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
lease = RunLease(url, ttl=ttl, endpoint_url=endpoint)
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
                 host: str = ""):
        # host: run on "another machine", a UTS namespace of its own with that hostname, where
        # this machine cannot tell whether the holder's pid is still alive
        other_host = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host]
        self.proc = subprocess.Popen(
            [*(other_host if host else []), sys.executable, "-c", HOLDER, url, endpoint,
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


def stored(url: str, endpoint: str) -> dict | None:
    """The lease record as the storage holds it now."""
    fs, root = fsspec.core.url_to_fs(url, **({"endpoint_url": endpoint} if endpoint else {}))
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
    backend = RunLease(url, ttl=60, endpoint_url=endpoint)._backend

    def record(n: int) -> bytes:
        return json.dumps({"version": 1, "token": f"t{n}", "renewed": 0.0, "ttl": 60.0,
                           "holder": {"pid": n}}).encode()

    def token() -> str | None:
        current = backend.read()
        return None if current is None else current[0]["token"]

    v1 = backend.create(record(1))
    assert v1 is not None and backend.read()[1] == v1
    assert backend.create(record(2)) is None and token() == "t1"
    v2 = backend.take_over(record(2), v1)
    assert v2 is not None and v2 != v1 and token() == "t2"
    assert backend.take_over(record(3), v1) is None and token() == "t2"  # a second taker of v1
    assert backend.renew(record(3), v1) is None and token() == "t2"
    assert backend.delete(v1) is False and token() == "t2"
    assert backend.delete(v2) is True and backend.read() is None
    assert backend.create(record(4)) is not None and token() == "t4"


def test_second_acquirer_is_refused_naming_the_holder(location):
    url, endpoint = location
    first = RunLease(url, ttl=60, endpoint_url=endpoint)
    first.acquire()
    try:
        record = stored(url, endpoint)
        assert record is not None and record["holder"] == first.holder
        assert record["ttl"] == 60
        with pytest.raises(LeaseHeldError) as refused:
            RunLease(url, ttl=60, endpoint_url=endpoint).acquire()
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
    winners, errors = race(lambda: RunLease(url, ttl=60, endpoint_url=endpoint))
    try:
        assert len(winners) == 1, errors
        assert len(errors) == 5 and all(isinstance(e, LeaseHeldError) for e in errors), errors
        assert stored(url, endpoint)["token"] == winners[0]._token
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
    lease = RunLease(url, ttl=60, endpoint_url=endpoint)
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
        RunLease(url, ttl=60, endpoint_url=endpoint).acquire()
    record = stored(url, endpoint)
    time.sleep(max(0.0, record["renewed"] + record["ttl"] - time.time()) + 0.2)
    # Expired now: of several takers reading the same dead lease, exactly one takes it over.
    winners, errors = race(lambda: RunLease(url, ttl=60, endpoint_url=endpoint))
    try:
        assert len(winners) == 1, errors
        assert all(isinstance(e, LeaseHeldError) for e in errors), errors
        assert str(holder.pid) not in "".join(map(str, errors))  # they name the new holder
        assert stored(url, endpoint)["token"] == winners[0]._token
    finally:
        for lease in winners:
            lease.release()


# A process that, at the same wall-clock moments as its rivals, tries each folder's lease once.
RACER = r"""
import sys, time
from pipeline.storage.lease import LeaseHeldError, RunLease
start, folders = float(sys.argv[1]), sys.argv[2:]
for i, folder in enumerate(folders):
    time.sleep(max(0.0, start + 0.05 * i - time.time()))
    try:
        RunLease(folder, ttl=60).acquire()  # held until this process ends
        print(i, flush=True)
    except LeaseHeldError:
        pass
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
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    wins = [int(line) for proc in procs for line in proc.communicate(timeout=60)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(wins) == list(range(30))


def test_requeued_slurm_job_takes_over_at_once_and_fences_the_old_process(
        location, holders, monkeypatch):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=60,
                    env={"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "0"})
    holders.append(holder)
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    with pytest.raises(LeaseHeldError, match="SLURM job 123 .restart 0."):
        RunLease(url, ttl=60, endpoint_url=endpoint).acquire()
    # Same job and restart, its process alive on this host: two trainers in one allocation.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LeaseHeldError):
        RunLease(url, ttl=60, endpoint_url=endpoint).acquire()
    # Requeued: SLURM has ended restart 0 (here it still runs, to show that it gets fenced).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    new = RunLease(url, ttl=60, endpoint_url=endpoint)
    new.acquire()  # long before the old lease's expiry
    try:
        assert new.holder["slurm_restart_count"] == 1
        # The old holder's heartbeat (every 15 s) has not run: its check() reads the lease.
        out = holder.command("check")
        assert out[0].startswith("LOST fenced: ") and f"pid {os.getpid()} " in out[0], out
        assert out[1] == "released"
        new.check()  # the fenced holder's release left the new lease alone
        assert stored(url, endpoint)["token"] == new._token
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
    with RunLease(url, ttl=60, endpoint_url=endpoint) as lease:
        assert lease.holder["slurm_job_id"] == "70_7"
        assert stored(url, endpoint)["token"] == lease._token


def test_paused_holder_is_fenced_after_takeover(location, holders):
    url, endpoint = location
    holder = Holder(url, endpoint, ttl=2)
    holders.append(holder)
    os.kill(holder.pid, signal.SIGSTOP)  # alive but silent: no heartbeat
    taker = RunLease(url, ttl=60, endpoint_url=endpoint)
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
        assert stored(url, endpoint)["token"] == taker._token
    finally:
        taker.release()


def test_heartbeat_keeps_the_lease_past_its_ttl(location):
    url, endpoint = location
    with RunLease(url, ttl=1, endpoint_url=endpoint) as lease:
        first = stored(url, endpoint)["renewed"]
        time.sleep(2.5)
        with pytest.raises(LeaseHeldError):
            RunLease(url, ttl=60, endpoint_url=endpoint).acquire()
        assert stored(url, endpoint)["renewed"] > first
        lease.check()


def test_release_lets_the_next_in_at_once_and_is_idempotent(location):
    url, endpoint = location
    first = RunLease(url, ttl=60, endpoint_url=endpoint)
    first.acquire()
    first.release()
    second = RunLease(url, ttl=60, endpoint_url=endpoint)
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
    lease = RunLease(url, ttl=2, endpoint_url=s3_proxy.endpoint)
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
    assert stored(url, s3_proxy.endpoint)["token"] == lease._token
    lease.release()
    assert stored(url, s3_proxy.endpoint) is None


def test_a_foreign_lease_object_is_refused_in_one_line(tmp_path):
    """The location's content is untrusted: a lease.json of another shape names itself and the
    fix instead of a KeyError deep in the takeover rules."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text('{"version": 1, "token": 5}')
    with pytest.raises(UserError, match="is not a lease this version writes") as refused:
        RunLease(str(tmp_path / "run"), ttl=5).acquire()
    assert "\n" not in str(refused.value).strip()
