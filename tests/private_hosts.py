"""Private "hosts" on this machine for multi-node tests: each a network namespace with its own
address on a private bridge, its own hostname (UTS namespace) and its own mount namespace, in
which /etc/hosts names every host and /mnt is the host's own local disk (a folder outside).
Traffic stays on the bridge, which the machine's root namespace joins at the gateway address
(where the tests run their shared servers: slurmctld, the S3 server). Needs root.

    with private_hosts(tmp_path, ["node1", "node2"]) as net:
        node1 = net.hosts[0]                       # .name, .address, .local (its /mnt)
        subprocess.run(node1.command(["hostname"]))   # -> node1, on 10.77.x.11
        net.gateway                                # the root namespace's address on the bridge

Run as a script to keep two hosts until Ctrl-C: `python tests/private_hosts.py /tmp/hosts`; it
prints the command for a shell on each.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SETUP = ('hostname "$HOST_NAME" && mount --bind "$HOSTS_FILE" /etc/hosts && '
         'mount --bind "$LOCAL_DIR" /mnt && exec "$@"')


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    namespace: str
    local: Path  # the host's /mnt, seen from outside
    hosts_file: Path

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host: in its network namespace, with its hostname, /etc/hosts and
        /mnt (new UTS and mount namespaces; the rest of the file system is shared, as a
        cluster's home and software are)."""
        # nsenter, not `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup (slurmd
        # needs it even without cgroup plugins).
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "env", f"HOST_NAME={self.name}",
                f"HOSTS_FILE={self.hosts_file}", f"LOCAL_DIR={self.local}",
                "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", SETUP, "sh", *argv]


@dataclass(frozen=True)
class Network:
    gateway: str  # the root namespace's address on the bridge
    hosts: list[Host]


def missing_tools() -> list[str]:
    import shutil

    return [t for t in ("ip", "nsenter", "unshare") if shutil.which(t) is None]


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """A 10.77.N.0/24 no route of this machine uses (another test run's bridge, say)."""
    routes = _ip("-4", "route")
    return next(f"10.77.{n}" for n in range(1, 255) if f"10.77.{n}." not in routes)


def _kill_namespace(namespace: str) -> None:
    """SIGKILL what still runs in the namespace: a namespace holding processes outlives
    `ip netns del`, with its veth and address."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                          timeout=30).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def private_hosts(root: Path, names: list[str]) -> Iterator[Network]:
    """Hosts `names` on a bridge of their own (a 10.77.N.0/24 no route uses yet; names carry
    this process's id); removed again on the way out, with whatever still runs on them."""
    tag = str(os.getpid())
    subnet = _free_subnet()
    bridge = f"anyb{tag}"
    root = Path(root)
    hosts_file = root / "etc-hosts"
    hosts = [Host(name, f"{subnet}.{11 + i}", f"any{tag}-{name}", root / name / "local",
                  hosts_file) for i, name in enumerate(names)]
    hosts_file.parent.mkdir(parents=True, exist_ok=True)
    hosts_file.write_text("127.0.0.1 localhost\n" + f"{subnet}.1 gateway\n" +
                          "".join(f"{h.address} {h.name}\n" for h in hosts))
    created: list[tuple[str, ...]] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        created.append(("link", "del", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, host in enumerate(hosts):
            host.local.mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", host.namespace)
            created.append(("netns", "del", host.namespace))
            created.append(("kill", host.namespace))
            outside = f"anyv{tag}-{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns",
                host.namespace)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield Network(f"{subnet}.1", hosts)
    finally:
        for args in reversed(created):  # a namespace's end takes its veth pair along
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                _kill_namespace(args[1]) if args[0] == "kill" else _ip(*args)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/private-hosts")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with private_hosts(folder, ["node1", "node2"]) as net:
        for h in net.hosts:
            print(f"{h.name} {h.address}: {shlex.join(h.command(['bash']))}")
        print(f"gateway {net.gateway}; Ctrl-C to remove them")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
