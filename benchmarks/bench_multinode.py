"""Multi-node timings on two private hosts of this machine (tests/private_hosts.py, as in
tests/test_multinode.py): seconds from submitting a job to its first training step, and from a
failure to the first step after the resume, for SLURM (sbatch; SIGUSR1 -> checkpoint -> requeue)
and Ray (ray_submit; a training worker SIGKILLed -> the group restarts), each on two nodes
against one node in the same run. Checkpoints go to a moto S3 server at the hosts' gateway.

    python benchmarks/bench_multinode.py [--out benchmarks/multinode_YYYYMMDD.md]   # as root

What the numbers include: SLURM's requeue waits `cred_expire` (10 s in the test cluster, 120 s
by default) before the job may start again; Ray restarts the group at once. Both include
starting Python, importing torch, building the model and the loaders, and (after a failure)
loading the checkpoint from S3. Tiny model and data: these are the engines' overheads, not
training speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_image_folder  # noqa: E402
from private_hosts import private_hosts  # noqa: E402
from ray_cluster import ray_head, ray_node, token_auth  # noqa: E402
from slurm_cluster import local_slurm_cluster  # noqa: E402

from pipeline.report import format_table  # noqa: E402
from pipeline.storage.local_s3 import local_s3_server  # noqa: E402

DEMO = "configs/demo_fmnist_resnet_ann.yaml"
EPOCHS = 8  # 192 steps: the failure comes well before the end, also seen through Ray's log
FAIL_AT = 40  # the step after which the failure comes


def overrides(endpoint: str, bucket: str, name: str) -> list[str]:
    return ["data.root=/mnt/data", "data.image_size=32", "data.augment=small",
            "train.global_batch=8", "data.batch_size=4", "data.workers=0", f"train.epochs={EPOCHS}",
            "train.log_every=1", "train.device=cpu", f"name={name}", "out_dir=/mnt/runs",
            f"checkpoint.url={bucket}/{name}", f"checkpoint.endpoint_url={endpoint}",
            "checkpoint.retry_delay=0.3", "checkpoint.lease_ttl=10", "checkpoint.every_steps=4"]


class Lines:
    """Lines of a growing log file or of a process's output, each with its arrival time."""

    def __init__(self, source: Path | subprocess.Popen):
        self.queue: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        target = self._follow_file if isinstance(source, Path) else self._follow_pipe
        threading.Thread(target=target, args=(source,), daemon=True).start()

    def _follow_file(self, path: Path) -> None:
        while not path.exists():
            time.sleep(0.05)
        with open(path, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    self.queue.put((time.monotonic(), line))
                else:
                    time.sleep(0.05)

    def _follow_pipe(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.queue.put((time.monotonic(), line))
        self.queue.put((time.monotonic(), None))  # the process ended

    def wait_for(self, text: str, timeout: float = 600.0) -> float:
        """When the next line holding `text` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, line = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise TimeoutError(f"no line with {text!r}; the last lines:\n" +
                                   "".join(self.seen[-40:]))
            self.seen.append(line)
            if text in line:
                return when


def slurm_run(cluster, endpoint: str, bucket: str, out: Path, name: str,
              nodes: list[str]) -> dict:
    layout = ["--nodes=2", "--ntasks-per-node=1"] if len(nodes) == 2 else \
        ["--nodes=1", "--nodelist=node1"]
    cluster.wait_idle()
    log = out / f"{name}.out"
    started = time.monotonic()
    job_id = cluster.sbatch([*layout, f"--output={log}", "slurm/train.sh", DEMO,
                             *overrides(endpoint, bucket, name)], cwd=ROOT,
                            env={"PYTHON": sys.executable})
    lines = Lines(log)
    first = lines.wait_for("step 1/")
    lines.wait_for(f"step {FAIL_AT}/")
    failed = time.monotonic()
    cluster.run("scancel", "--signal=USR1", job_id)
    lines.wait_for("resumed from")
    resumed = lines.wait_for("  step ")  # a progress line: the first step after the resume
    cluster.wait(job_id, "COMPLETED", timeout=600)
    return {"submit_to_first_step_s": first - started, "failure_to_resumed_step_s":
            resumed - failed}


def ray_run(cluster, endpoint: str, bucket: str, name: str, workers: int) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.ray_submit", "--address", cluster.dashboard,
         "--config", DEMO, "--num-workers", str(workers), "--max-failures", "3",
         *overrides(endpoint, bucket, name)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = Lines(proc)
        first = lines.wait_for("step 1/")
        lines.wait_for(f"step {FAIL_AT}/")
        # The worker that logged the step (rank 0): Ray's prefix names its pid.
        victim = int(re.search(r"RayTrainWorker pid=(\d+)", lines.seen[-1]).group(1))
        failed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        lines.wait_for("resumed from")
        resumed = lines.wait_for("  step ")  # a progress line: the first step after the resume
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode:
        raise RuntimeError(f"the Ray job {name} failed ({proc.returncode})")
    return {"submit_to_first_step_s": first - started, "failure_to_resumed_step_s":
            resumed - failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--engines", default="slurm,ray", help="slurm, ray or both (default)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces and slurmd")
    os.chdir(ROOT)
    import s3fs

    rows = []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-multinode-", dir="/tmp"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        net = stack.enter_context(private_hosts(work / "hosts", ["node1", "node2"]))
        data = write_image_folder(work / "data", counts={"train": 64, "val": 4})
        for host in net.hosts:
            shutil.copytree(data, host.local / "data")
        endpoint = stack.enter_context(local_s3_server(host=net.gateway))
        bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket.removeprefix("s3://"))

        slurm = stack.enter_context(local_slurm_cluster(work / "slurm", network=net))
        for label, nodes in (("1 node", ["node1"]), ("2 nodes", ["node1", "node2"])) * \
                ("slurm" in args.engines):
            result = slurm_run(slurm, endpoint, bucket, work, f"slurm{len(nodes)}", nodes)
            rows.append({"engine": "SLURM", "nodes": label, **result})
            print(rows[-1], flush=True)

        stack.enter_context(token_auth(work))
        ray = stack.enter_context(ray_head(work, host=net.hosts[0], cpus=1))
        stack.enter_context(ray_node(ray, net.hosts[1], work, cpus=1))
        # Ray places a 1-worker group on either host (1 CPU each): the row is by workers.
        for label, workers in (("1 worker", 1), ("2 (1/node)", 2)) * ("ray" in args.engines):
            result = ray_run(ray, endpoint, bucket, f"ray{workers}", workers)
            rows.append({"engine": "Ray", "nodes": label, **result})
            print(rows[-1], flush=True)

    table = format_table(rows, ["engine", "nodes", "submit_to_first_step_s",
                                "failure_to_resumed_step_s"])
    ratios = []
    for engine in {r["engine"]: None for r in rows}:
        one, two = (r for r in rows if r["engine"] == engine)
        ratios.append(f"{engine}: {two['nodes']} / {one['nodes']}: submit to first step "
                      f"{two['submit_to_first_step_s'] / one['submit_to_first_step_s']:.2f}x, "
                      f"failure to resumed step "
                      f"{two['failure_to_resumed_step_s'] / one['failure_to_resumed_step_s']:.2f}x")
    print(table)
    print("\n".join(ratios))
    if args.out:
        args.out.write_text(
            f"# Multi-node: submit to first step, failure to resumed step "
            f"({datetime.date.today().isoformat()})\n\n"
            f"`python benchmarks/bench_multinode.py` on {platform.node()} "
            f"({os.cpu_count()} cores, Python {platform.python_version()}): two private hosts "
            "(network, UTS, mount namespaces) with 1 CPU each, moto S3 at their gateway. "
            f"Failure: SLURM, SIGUSR1 after step {FAIL_AT} (checkpoint, requeue, 10 s "
            f"cred_expire wait, restart); Ray, rank 0's worker SIGKILLed once its step "
            f"{FAIL_AT} line arrived through the job's log (the group restarts from the newest "
            "checkpoint, every 4 steps). Ray's times include the job log's delay.\n\n"
            f"```\n{table}\n```\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n")


if __name__ == "__main__":
    main()
