"""A real Ray cluster for the tests: `ray start --head --block` with the dashboard (Ray Jobs,
the state API) and token authentication, on 127.0.0.1, or on a private host
(tests/private_hosts.py) with more nodes joining from other private hosts.

    with token_auth(tmp), ray_head(tmp) as cluster:               # one node on 127.0.0.1
        ... ray.init(cluster.address) / JobSubmissionClient(cluster.dashboard) ...
    with token_auth(tmp), ray_head(tmp, host=node1) as cluster, \\
            ray_node(cluster, node2) as worker: ...               # two nodes; worker.stop()
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from private_hosts import Host

from pipeline.storage.local_s3 import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent


class RayMissing(RuntimeError):
    """Ray is not installed (the tests skip, or fail on CI)."""


class RayStartError(RuntimeError):
    """`ray start` did not come up or a node did not join: a failure, never a skip."""


@dataclass
class RayCluster:
    address: str  # GCS, for ray.init / --address
    dashboard: str  # HTTP: job server and state API


# One token per test process: Ray's client reads it once, so a second cluster in the same
# process (test_multinode.py, then test_ray.py) must be started with the same one.
_TOKEN = secrets.token_hex(32)


@contextlib.contextmanager
def token_auth(folder: Path) -> Iterator[None]:
    """Token authentication, as Ray sets up by default, with a token of this cluster's own that
    every client here (launchers, job client, state API) and every node reads from the same
    variables. Set before Ray is imported: it reads them once."""
    token = folder / "auth_token"
    token.write_text(_TOKEN)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    saved = {k: os.environ.get(k) for k in (*auth, "RAY_AUTH_TOKEN")}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(auth)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_bin() -> Path:
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        raise RayMissing(f"no `ray` command next to {sys.executable}")
    return ray_bin


def _env() -> dict[str, str]:
    # Stop at once when told: by then the tests are done, nothing is left to drain. A job's
    # `python` is this interpreter, also when its venv is not activated. A lost node (a raylet
    # SIGKILLed: its health checks are refused at once) is declared dead after 3 checks 1 s
    # apart, not Ray's 5 x 3 s; a slow node still has each check's 10 s to answer. Every log
    # line is printed: Ray's dedup folds lines that differ only in numbers ("rank 0/2" and
    # "rank 1/2") into one, depending on timing, and the tests count them. A Ray Train
    # controller that sized a new group from a stale view of the cluster (a node just lost still
    # counted: its placement group cannot be placed) gives up on it after 10 s, not 60 s, and
    # sizes the group again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S bounds only that wait for
    # the placement group, which takes no time when the resources are there).
    bin_dir = str(_ray_bin().parent)
    return {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "RAY_DEDUP_LOGS": "0",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def ray_head(temp_dir: Path, host: Host | None = None, cpus: int = 2) -> Iterator[RayCluster]:
    """`ray start --head --block`: terminating that one process stops the whole cluster. On
    `host`, Ray keeps its session files on the host's own disk (/mnt/ray): two nodes sharing
    one temp dir would share their sockets."""
    address = host.address if host else "127.0.0.1"
    gcs_port, dashboard_port = free_port(), free_port()
    argv = [str(_ray_bin()), "start", "--head", "--block", f"--node-ip-address={address}",
            f"--port={gcs_port}", f"--num-cpus={cpus}", "--num-gpus=0",
            "--object-store-memory=100000000", "--include-dashboard=true",
            f"--dashboard-host={address}", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={'/mnt/ray' if host else temp_dir}", "--disable-usage-stats"]
    log = temp_dir / "ray_head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(host.command(argv) if host else argv, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    cluster = RayCluster(f"{address}:{gcs_port}", f"http://{address}:{dashboard_port}")
    try:
        wait_for_dashboard(cluster.dashboard, proc, log)
        yield cluster
    finally:
        _stop(proc)


class RayNode:
    """A node that joined a cluster from a private host: `stop()` takes it away (its raylet
    and everything on it), `start()` brings it back."""

    def __init__(self, cluster: RayCluster, host: Host, temp_dir: Path, cpus: int):
        self.cluster, self.host, self.temp_dir, self.cpus = cluster, host, temp_dir, cpus
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        argv = [str(_ray_bin()), "start", "--block", f"--address={self.cluster.address}",
                f"--node-ip-address={self.host.address}", f"--num-cpus={self.cpus}",
                "--num-gpus=0", "--object-store-memory=100000000", "--temp-dir=/mnt/ray",
                "--disable-usage-stats"]
        log = self.temp_dir / f"ray_{self.host.name}.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(self.host.command(argv), stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO, env=_env())
        deadline = time.monotonic() + timeout
        while self.host.address not in alive_nodes(self.cluster):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RayStartError(f"Ray node on {self.host.name} did not join; its log "
                                    f"ends: {log.read_text()[-1000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGKILL the node's Ray processes (`ray start` and everything it started: GCS
        client, raylet, workers, agents): a lost machine says no goodbye. Other processes of
        the host (a slurmd of another test's cluster) are left alone."""
        if self.proc is not None:
            for _ in range(3):  # again: a process may have forked meanwhile
                for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive_nodes(cluster: RayCluster) -> list[str]:
    """The addresses of the cluster's live nodes."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.dashboard, raise_on_missing_output=False)
    return [n.node_ip for n in nodes if n.state == "ALIVE"]


@contextlib.contextmanager
def ray_node(cluster: RayCluster, host: Host, temp_dir: Path, cpus: int = 1) -> Iterator[RayNode]:
    node = RayNode(cluster, host, temp_dir, cpus)
    try:
        node.start()
        yield node
    finally:
        node.stop()


def wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    host, port = url.removeprefix("http://").rsplit(":", 1)
    wait_for_port(int(port), timeout=90, host=host)
    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception as e:  # not up yet: connection refused, 503, ...
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RayStartError(f"`ray start --head` did not come up "
                                    f"({type(e).__name__}: {e}); its log ends: "
                                    f"{log.read_text()[-1000:]}") from e
            time.sleep(1.0)
