"""Shared fixtures: tiny ImageNet-layout folders of real JPEG files; a real S3 server."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# One torch thread per process, here and in every process a test starts (they inherit it), set
# before anything imports torch. `make test` runs two tests at a time on 2 cores, and most tests
# start several trainers besides: with a thread per core each, they wait on each other's threads
# (the suite on 2 cores, two workers: 1077 s with torch's default, 845 s with one, 2026-12-06).
# A test that needs more threads sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.storage.local_s3 import free_port, local_s3_server  # noqa: E402

# torchrun of this interpreter's torch: tests also run from a venv that is not activated
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


# The files that take longest, longest first (`--durations` of a two-worker run on 2 cores,
# 2026-12-06). `make test` hands whole files to two workers (`--dist loadfile`) in collection
# order: started first, these no longer leave one worker running alone at the end of the run.
LONGEST_FILES = ("test_multinode.py", "test_ray.py", "test_run_integrity.py", "test_train_e2e.py",
                 "test_slurm.py", "test_fault_tolerance.py", "test_reproduce.py",
                 "test_timm_contract.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


# A test still running after this long (setup and teardown included) fails where it is, with
# every thread's stack printed, and the run goes on with its teardown and the next test: a hang
# costs 10 minutes, not CI's whole limit. The longest test takes about 80 s (two workers on 2
# cores). A SIGALRM, so that the failure is an exception in the test (pytest-timeout's "signal"
# method, without the dependency): ending the process instead would skip the fixtures' teardown,
# and pytest-xdist would run the hung test again in each new worker. Code that never returns to
# the interpreter (a C call holding the GIL) is not stopped. TEST_TIMEOUT=0: no bound.
TEST_TIMEOUT = float(os.environ.get("TEST_TIMEOUT", 600))


def pytest_configure(config: pytest.Config) -> None:
    # The real stderr, taken while pytest's capture is suspended: what is written to the
    # captured one shows only with the test's report, and the stacks should show at once.
    config.stash[_STDERR] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    os.close(config.stash[_STDERR])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if TEST_TIMEOUT <= 0:
        return (yield)

    def timed_out(signum: int, frame: object) -> None:
        stderr = item.config.stash[_STDERR]
        os.write(stderr, f"\n{item.nodeid}: still running after {TEST_TIMEOUT:.0f} s; its "
                         "threads:\n".encode())
        faulthandler.dump_traceback(file=stderr)
        pytest.fail(f"still running after {TEST_TIMEOUT:.0f} s (TEST_TIMEOUT)", pytrace=True)

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_STDERR = pytest.StashKey[int]()


def unavailable(reason: str, module_level: bool = False) -> None:
    """A real component the test needs is missing: CI must run every test, so there it fails;
    elsewhere it skips (the whole module, called at its top with `module_level`)."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def largest_parameter_difference(a: dict, b: dict) -> float:
    """The largest difference between two run states' parameters. Not BatchNorm's running
    statistics: each rank keeps its own (DDP broadcasts rank 0's), so they differ by design
    between runs on other numbers of ranks or passes."""
    keys = [k for k in a["model"] if "running_" not in k and "num_batches" not in k]
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in keys)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0,
               proc: subprocess.Popen | None = None, every: float = 0.02) -> None:
    """Poll `condition` (every 20 ms, or `every` s for a condition that costs requests) until it
    holds; fail naming `what` after `timeout`, or at once when `proc`, the process that should
    bring it about, has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"no {what}: the process exited with {proc.returncode}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(every)


def handles(pid: int, sig: signal.Signals) -> bool:
    """The process has a handler of its own on `sig` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (sig - 1)))


def committed_steps(store) -> list[int]:
    """The steps of a CheckpointStore's committed checkpoints, from its listing: only manifests
    are read, and the manifest is written last, so a sound one means a whole checkpoint. Cheap
    to poll, unlike `latest_valid()`, which downloads and verifies a whole payload each time."""
    return [info.step for info in store.list() if info.problem is None]


def wait_for_checkpoint(store, proc: subprocess.Popen, min_step: int = 1, *, endpoint: str = "",
                        timeout: float = 300.0) -> int:
    """The step of the first committed checkpoint at `min_step` or later in `store` (a
    CheckpointStore, or its URL and `endpoint`) that `proc`, the training process, writes; polls
    the listing. Fails when `proc` exits first or after `timeout`, with the end of its output
    where it was piped."""
    if isinstance(store, str):
        from pipeline.storage.checkpoints import CheckpointStore

        store = CheckpointStore(store, endpoint_url=endpoint)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        # every 0.2 s: a listing is a few requests, and the trainer shares the CPUs with them
        if (steps := committed_steps(store)) and steps[-1] >= min_step:
            return steps[-1]
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    output = "(not captured)"
    with contextlib.suppress(subprocess.TimeoutExpired):  # a child may hold the pipe open
        out, err = proc.communicate(timeout=30)
        output = (out or "") + (err or "") or output
    raise AssertionError(f"no checkpoint at step >= {min_step} in {store.url} "
                         f"(exit code {proc.returncode}); its output ends:\n{output[-5000:]}")


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m pipeline ARGS` as main(ARGS) in this process: exit code, stdout, stderr. A
    subprocess pays torch's import (~5 s on CI) for each command; the command line itself is
    tested by the tests that run `python -m pipeline` (test_cli.py's cli(), test_config.py)."""
    from pipeline.__main__ import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_weights(a: dict, b: dict) -> None:
    """Two state dicts hold the same tensors, bit for bit, under the same names."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0,
                                   msg=lambda message, key=key: f"{key}: {message}")


def payload_path(fs, folder: str) -> str:
    """The path of the one payload object (`state-<upload id>.pt`) in a checkpoint folder."""
    fs.invalidate_cache()
    [path] = [p for p in fs.ls(folder, detail=False) if p.rsplit("/", 1)[-1].startswith("state")]
    return path


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    counts: dict[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """root/{split}/<class>/<class>_<i>.JPEG random-noise JPEGs; 12 train and 4 val per class."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or {"train": 12, "val": 4}).items():
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x (12 train, 4 val) 32x32 JPEGs under tmp_path/data."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """A factory for folders with other classes, counts or sizes: make_image_folder(name, ...)."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make


# --- a real S3-compatible server (moto_server) on 127.0.0.1, reached through s3fs -------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server in its own process; yields its endpoint URL."""
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket per test; yields its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(name)
    return f"s3://{name}"


class Proxy:
    """A TCP forwarder process in front of a server (tests/tcp_proxy.py): stop() cuts every
    connection for real, a rate throttles them, hold() stalls them until release(); with
    `report`, wait_for() waits on the HTTP exchanges it prints as they pass."""

    def __init__(self, target_port: int, rate: float = 0.0, report: bool = False):
        self.port = free_port()
        self.target_port = target_port
        self.rate = rate  # bytes/s per direction and connection; 0 = as fast as it goes
        self.report = report
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._new_line = threading.Condition()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "tcp_proxy.py"), str(self.port),
             str(self.target_port), str(self.rate), *(["--report"] if self.report else [])],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout) -> None:
        for line in stdout:  # read always, so that the proxy never blocks on a full pipe
            with self._new_line:
                self.lines.append(line.strip())
                self._new_line.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120, after: int = 0) -> re.Match:
        """The first printed line from index `after` on that matches `pattern` (re.search)."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines[after:]:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, \
                    f"the proxy printed no line like {pattern!r}: {self.lines[-20:]}"
                self._new_line.wait(left)

    def hold(self) -> None:
        seen = len(self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        self.wait_for("^held$", timeout=10, after=seen)

    def release(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        """Kill the proxy; every line it printed is in `lines` afterwards."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(timeout=10)
            self.proc = None


@pytest.fixture
def s3_proxy(s3_server: str) -> Iterator[Proxy]:
    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """1,000 training and 1,000 validation images of Fashion-MNIST as real JPEGs."""
    from pipeline.data.prepare import prepare_fashion_mnist

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        message = "needs Debian's dataset-fashion-mnist (make install)"
        unavailable(message)
    root = tmp_path_factory.mktemp("fmnist") / "data"
    prepare_fashion_mnist(root, limit=1000)
    return root


# --- a real one-node SLURM cluster (munged, slurmctld, slurmd) on 127.0.0.1 -------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Debian's slurm-wlm + munge daemons, started here and stopped at the end; sets nothing in
    os.environ (use cluster.env / cluster.sbatch). Needs root: slurmd starts jobs as their user."""
    from slurm_cluster import local_slurm_cluster, missing_binaries

    missing = missing_binaries()
    reason = ""
    if missing:
        reason = f"needs {', '.join(missing)}: apt-get install slurm-wlm munge (make install)"
    elif os.geteuid() != 0:
        reason = "slurmd must run as root to start jobs"
    if reason:
        unavailable(reason)
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


# --- resuming an epoch on another number of ranks ----------------------------------------------


def consume_across_resize(build, old: tuple[int, int], new: tuple[int, int], steps: int,
                          epoch: int = 1) -> tuple[list[tuple[int, int]], list[tuple[int, int]],
                                                   dict]:
    """One epoch interrupted and resumed on another world: `build(rank, world_size, batch_size)`
    makes one rank's loader. `steps` batches on each of old = (world_size, batch_size) ranks
    (simulated in this process, in lock step), the state saved, then the rest of the epoch on
    new = (world_size, batch_size) ranks. Returns the (sample index, label) pairs consumed before
    the interruption and after it, and the state."""
    world, batch = old
    loaders = [build(rank, world, batch) for rank in range(world)]
    for loader in loaders:
        loader.set_epoch(epoch)
    batches = [loader.batches_with_indices() for loader in loaders]
    before = []
    for _ in range(steps):
        for it in batches:
            _, labels, ids = next(it)
            before += zip(ids.tolist(), labels.tolist())
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # every rank knows the global position
    del batches, loaders  # the job is preempted here
    world, batch = new
    after = []
    for rank in range(world):
        loader = build(rank, world, batch)
        loader.set_epoch(epoch)
        loader.load_state_dict(states[0])
        left = loader.batches_left
        got = list(loader.batches_with_indices())
        assert len(got) == left and all(len(ids) == batch for *_, ids in got)
        after += [p for _, labels, ids in got for p in zip(ids.tolist(), labels.tolist())]
        assert loader.batches_left == 0
    return before, after, states[0]
