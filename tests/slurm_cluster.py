"""A real SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's `slurm-wlm`
and `munge`, each in the foreground in its own process, with every file (config, key, sockets,
state, logs) under one folder. Nothing is installed here: `make install` apt-installs the
packages. One node on 127.0.0.1, or one slurmd per private host (tests/private_hosts.py: its
own network, UTS and mount namespaces) with slurmctld at the hosts' gateway address.

    with local_slurm_cluster(tmp_path) as cluster:   # sets SLURM_CONF for sbatch/squeue/scontrol
        job_id = cluster.sbatch(["slurm/train.sh", "configs/x.yaml"])
        cluster.wait(job_id, "COMPLETED")
    with private_hosts(tmp_path, ["node1", "node2"]) as net, \
            local_slurm_cluster(tmp_path / "slurm", network=net) as cluster: ...

Run as a script to start a cluster by hand and keep it until Ctrl-C:
`python tests/slurm_cluster.py /tmp/slurm` then `export SLURM_CONF=/tmp/slurm/slurm.conf`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from private_hosts import Network

from pipeline.storage.local_s3 import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Final states: the job will not run again (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


def missing_binaries() -> list[str]:
    """The daemons and client commands that are not installed (`make install` brings them)."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=search) is None]


def _binary(name: str) -> str:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    path = shutil.which(name, path=search)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install slurm-wlm munge)")
    return path


def _die_with_parent() -> None:
    """In the child before exec: its own session (a Ctrl-C in the terminal is not for it), and
    SIGTERM when the process that started it dies, so a killed test run leaves no daemons."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _slurm_conf(root: Path, ctld_address: str, nodes: list[tuple[str, str, int]],
                ctld_port: int, slurmd_port: int) -> str:
    # Nodes (name, address, CPUs). No cgroups (proctrack/linuxproc, task/none): they need a
    # delegated cgroup tree that containers rarely give; no accounting daemon (slurmdbd), so job
    # states come from scontrol, kept for MinJobAge seconds after the end.
    return f"""\
ClusterName=pytest
SlurmctldHost=localhost({ctld_address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
""" + "".join(f"NodeName={name} NodeAddr={address} CPUs={cpus} State=UNKNOWN\n"
              for name, address, cpus in nodes) + \
        f"PartitionName=debug Nodes={','.join(n for n, _, _ in nodes)} Default=YES " \
        "MaxTime=INFINITE State=UP\n"


class LocalSlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None, network: Network | None = None):
        """`cpus` per node: by default, on 127.0.0.1, at least 2, so that a two-rank job fits
        on a one-core machine too (config_overrides); 1 per private host."""
        self.root = Path(root)
        self.network = network
        if network is None:
            self.nodes = [("localhost", "127.0.0.1", cpus or max(os.cpu_count() or 1, 2))]
        else:
            self.nodes = [(h.name, h.address, cpus or 1) for h in network.hosts]
        self.conf = self.root / "slurm.conf"
        self._procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """This process's environment (read now: fixtures may add to it later) + SLURM_CONF.
        sbatch passes it on to the job (--export=ALL)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- daemons ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n, _, _ in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_address = self.network.gateway if self.network else "127.0.0.1"
        self.conf.write_text(_slurm_conf(self.root, ctld_address, self.nodes, free_port(),
                                          free_port()))
        munge = self.root / "munge"
        self._spawn("munged", [_binary("munged"), "--foreground", "--force",
                               f"--socket={munge}/munge.socket", f"--key-file={key}",
                               f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged's socket")
        # -i: ignore state left by an earlier cluster; -D: stay in the foreground.
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
        for name, _, _ in self.nodes:
            argv = [_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)]
            if self.network is not None:
                argv = next(h for h in self.network.hosts if h.name == name).command(argv)
            self._spawn(f"slurmd-{name}", argv)
        names = ", ".join(n for n, _, _ in self.nodes)
        self._wait_for(self._nodes_idle, timeout, f"slurmd (nodes {names} idle)")

    def stop(self) -> None:
        ctld_up = False
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ctld_up = bool(self._procs) and self._ok(["scontrol", "ping"], "UP")
        if ctld_up:
            # Cancel what still runs so that no training process outlives the cluster (also
            # when a slurmd died: its node's jobs are cancelled by slurmctld).
            user = pwd.getpwuid(os.getuid()).pw_name
            with contextlib.suppress(OSError, subprocess.SubprocessError, TimeoutError,
                                     RuntimeError):
                self.run("scancel", "--full", f"--user={user}", check=False)
                self._wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                               30, "the cancelled jobs to end")
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (lives with the proc)
        self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, preexec_fn=_die_with_parent))
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while "
                                       f"waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout}s:\n{self.logs()}")

    def _ok(self, argv: list[str], needle: str) -> bool:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        return done.returncode == 0 and needle in done.stdout

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until every node is idle (a finished job's nodes are 'completing' for a moment)."""
        self._wait_for(self._nodes_idle, timeout, "every node idle")

    def _nodes_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env,
                              capture_output=True, text=True, timeout=30)
        return done.stdout.split() == ["idle"] * len(self.nodes)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- jobs ---------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
        return done

    def sbatch(self, argv: list[str], cwd: str | Path | None = None,
               env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        done = subprocess.run(["sbatch", "--parsable", *argv], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60, cwd=cwd)
        if done.returncode:
            raise RuntimeError(f"sbatch {' '.join(argv)} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, StdOut, ..."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until: set[str] | str = frozenset(FINAL_STATES),
             timeout: float = 180.0) -> dict[str, str]:
        """Poll until the job's state is in `until`; returns the job's fields."""
        until = {until} if isinstance(until, str) else set(until)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if info.get("JobState") in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {info.get('JobState')}, waiting for "
                                     f"{sorted(until)}: {info}\n{self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not {sorted(until)} after {timeout}s: "
                           f"{self.job(job_id)}\n{self.logs()}")


def wait_for_line(path: Path, text: str, timeout: float = 300.0) -> None:
    """Until a job's log file holds `text`; else an AssertionError showing its end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    log = path.read_text(errors="replace") if path.is_file() else "(no log yet)"
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{log[-3000:]}")


@contextlib.contextmanager
def local_slurm_cluster(root: Path, cpus: int | None = None,
                        network: Network | None = None) -> Iterator[LocalSlurmCluster]:
    cluster = LocalSlurmCluster(root, cpus, network)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    # python tests/slurm_cluster.py [FOLDER] [NODE NODE ...]: with node names, one slurmd per
    # private host of that name (tests/private_hosts.py), else one node on 127.0.0.1.
    from private_hosts import private_hosts

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-cluster")
    names = sys.argv[2:]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on kill, too
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(private_hosts(folder / "hosts", names)) if names else None
        c = stack.enter_context(local_slurm_cluster(folder / "slurm" if names else folder,
                                                    network=net))
        for h in net.hosts if net else []:
            print(f"{h.name}: {h.address}, its /mnt is {h.local}")
        print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C or kill stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
