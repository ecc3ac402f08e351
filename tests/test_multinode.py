"""Two nodes for real: a SLURM cluster whose two slurmd run on two private hosts
(tests/private_hosts.py: each its own network namespace and address, hostname and mount
namespace with a local disk of its own at /mnt), slurmctld and the S3 server at the hosts'
gateway. S3 is the only storage both nodes share: each node has its own copy of the data and its
own run folder under /mnt, as cluster nodes with local scratch disks do.

slurm/train.sh runs DDP (gloo) across both nodes, its rendezvous taken from the job's node list;
SIGUSR1 (what `--signal=USR1@T` sends) makes it save to S3 and requeue; it resumes across both
nodes, or on node1 alone when node2 was drained meanwhile. Each ends like a one-node run of the
same global batch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import (
    largest_parameter_difference,
    unavailable,
    wait_for_checkpoint,
    wait_until,
    write_image_folder,
)
from private_hosts import missing_tools, private_hosts
from ray_cluster import RayMissing, alive_nodes, ray_head, ray_node, token_auth
from slurm_cluster import local_slurm_cluster, missing_binaries, wait_for_line

from pipeline.storage.checkpoints import CheckpointStore
from pipeline.storage.local_s3 import local_s3_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo_fmnist_resnet_ann.yaml"
# A global batch of 8: 4 per node on two nodes, 2 passes of 4 on one.
TRAIN_IMAGES, BATCH, EPOCHS = 3 * 64, 8, 2
STEPS = EPOCHS * (TRAIN_IMAGES // BATCH)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    missing = missing_tools() + missing_binaries()
    reason = ""
    if missing:
        reason = f"needs {', '.join(missing)}: apt-get install iproute2 slurm-wlm munge"
    elif os.geteuid() != 0:
        reason = "network namespaces and slurmd need root"
    if reason:
        unavailable(reason)
    with private_hosts(tmp_path_factory.mktemp("hosts"), ["node1", "node2"]) as net:
        yield net


@pytest.fixture(scope="module")
def cluster(network, tmp_path_factory):
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm2"), network=network) as c:
        yield c


@pytest.fixture(scope="module")
def s3(network):
    """moto's S3 server at the gateway: what both nodes (and this test) reach."""
    import s3fs

    with local_s3_server(host=network.gateway) as endpoint:
        bucket = f"multinode-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        yield {"endpoint": endpoint, "bucket": f"s3://{bucket}"}


@pytest.fixture(scope="module")
def local_data(network, tmp_path_factory) -> str:
    """The same images on each node's own disk, at /mnt/data there."""
    source = write_image_folder(tmp_path_factory.mktemp("mn-data") / "data",
                                counts={"train": TRAIN_IMAGES // 3, "val": 4})
    for host in network.hosts:
        shutil.copytree(source, host.local / "data")
    return "/mnt/data"


def overrides(s3, data: str, name: str) -> list[str]:
    return [f"data.root={data}", "data.image_size=32", "data.augment=small",
            f"train.global_batch={BATCH}", f"data.batch_size={BATCH // 2}", "data.workers=0",
            f"train.epochs={EPOCHS}", "train.log_every=1", "train.device=cpu",
            f"name={name}", "out_dir=/mnt/runs",  # each node's own disk
            f"checkpoint.url={s3['bucket']}/{name}", f"checkpoint.endpoint_url={s3['endpoint']}",
            "checkpoint.retry_delay=0.3", "checkpoint.every_steps=4"]


def submit(cluster, s3, data: str, out: Path, name: str, *sbatch_args: str) -> str:
    return cluster.sbatch([*sbatch_args, f"--output={out}/{name}-%j.out", "slurm/train.sh", DEMO,
                           *overrides(s3, data, name)], cwd=REPO, env={"PYTHON": sys.executable})


def final_state(s3, name: str) -> dict:
    store = CheckpointStore(f"{s3['bucket']}/{name}", endpoint_url=s3["endpoint"])
    return store.load(store.latest_valid())


def assert_ends_like(s3, name: str, reference: dict, what: str) -> None:
    """The run's last checkpoint: every step taken, and the reference's parameters up to
    floating-point reduction order (the difference measured is printed)."""
    state = final_state(s3, name)
    assert state["step"] == reference["step"] == STEPS
    gap = largest_parameter_difference(state, reference)
    print(f"{what} vs one node: largest weight difference {gap:.2e}")
    assert gap < 1e-4


@pytest.fixture(scope="module")
def one_node_reference(cluster, s3, local_data, tmp_path_factory) -> dict:
    """The same run on node1 alone, uninterrupted: one process, 2 passes of 4 per step."""
    out = tmp_path_factory.mktemp("reference")
    job_id = submit(cluster, s3, local_data, out, "reference", "--nodes=1", "--nodelist=node1")
    info = cluster.wait(job_id, "COMPLETED", timeout=400)
    assert info["Restarts"] == "0"
    log = (out / f"reference-{job_id}.out").read_text()
    assert f"batch {BATCH} ({BATCH // 2} x 1 processes x 2 passes)" in log
    return final_state(s3, "reference")


def preempt_at_step(cluster, log: Path, job_id: str, step: int) -> None:
    wait_for_line(log, f"step {step}/")
    cluster.run("scancel", "--signal=USR1", job_id)  # every task, on both nodes


def test_two_nodes_train_preempt_requeue_and_resume_from_s3(cluster, s3, local_data,
                                                            one_node_reference, network,
                                                            tmp_path):
    job_id = submit(cluster, s3, local_data, tmp_path, "two", "--nodes=2",
                    "--ntasks-per-node=1")
    log = tmp_path / f"two-{job_id}.out"
    preempt_at_step(cluster, log, job_id, 10)
    info = cluster.wait(job_id, "COMPLETED", timeout=400)
    text = log.read_text()
    assert info["Restarts"] == "1", text
    assert info["NodeList"] == "node[1-2]", info
    # Rendezvous at node1, which only the nodes' own /etc/hosts names; one rank per node.
    assert text.count("2 node(s), 2 task(s)") == 2 and "rendezvous node1:" in text
    assert text.count(f"batch {BATCH} ({BATCH // 2} x 2 processes)") == 2
    assert text.count("preempted (SIGUSR1): checkpoint at step") == 2  # both ranks
    assert "resumed from s3://" in text
    # Each node keeps its own run folder: rank 0's metrics and results on node1 only.
    node1, node2 = network.hosts
    assert (node1.local / "runs" / "two" / "results.json").is_file()
    assert not (node2.local / "runs" / "two" / "results.json").exists()

    assert_ends_like(s3, "two", one_node_reference, "two nodes (preempted, resumed)")


def test_requeue_onto_one_node_when_the_other_is_drained(cluster, s3, local_data,
                                                         one_node_reference, tmp_path):
    cluster.wait_idle()  # both nodes free, so that the job takes both
    # No --ntasks-per-node: with it the task count is fixed at submission, and a node range
    # takes its minimum (slurm/common.sh: one task per node, or per GPU, otherwise).
    job_id = submit(cluster, s3, local_data, tmp_path, "shrink", "--nodes=1-2")
    log = tmp_path / f"shrink-{job_id}.out"
    wait_for_line(log, "step 3/")
    assert "2 node(s), 2 task(s)" in log.read_text()  # as many as there are
    cluster.run("scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=maintenance")
    try:
        preempt_at_step(cluster, log, job_id, 10)
        info = cluster.wait(job_id, "COMPLETED", timeout=400)
    finally:
        cluster.run("scontrol", "update", "NodeName=node2", "State=RESUME")
    text = log.read_text()
    assert info["Restarts"] == "1" and info["NodeList"] == "node1", info
    assert f"job {job_id} start 2: 1 node(s), 1 task(s)" in text
    assert f"batch {BATCH} ({BATCH // 2} x 1 processes x 2 passes)" in text
    assert "resumed from s3://" in text

    assert_ends_like(s3, "shrink", one_node_reference, "two nodes, then node1 alone")


def test_two_nodes_read_mostly_their_own_shards_from_s3(cluster, s3, local_data, network,
                                                       tmp_path):
    """One epoch from tar shards in S3 on two nodes: each node fetches its blocks into its own
    cache (/mnt/cache, its local disk) and reads at most ~60% of the epoch's bytes."""
    from pipeline.data.shard_writer import prepare_shards
    from pipeline.data.shards import load_shard_index

    cluster.wait_idle()
    node1, node2 = network.hosts
    shards = f"{s3['bucket']}/shards"
    prepare_shards(node1.local / "data", shards, images_per_shard=32, workers=1,
                   endpoint_url=s3["endpoint"])
    name = "shards"
    job_id = cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/{name}-%j.out",
         "slurm/train.sh", DEMO, *overrides(s3, f"{shards}/shards.json", name),
         f"data.endpoint_url={s3['endpoint']}", "data.cache_dir=/mnt/cache", "data.shard_block=8",
         "train.epochs=1"], cwd=REPO, env={"PYTHON": sys.executable})
    info = cluster.wait(job_id, "COMPLETED", timeout=400)
    text = (tmp_path / f"{name}-{job_id}.out").read_text()
    assert info["NodeList"] == "node[1-2]", text[-3000:]
    assert final_state(s3, name)["step"] == TRAIN_IMAGES // BATCH
    # an epoch's bytes: its shards' (tiny JPEGs here: the tar headers are half of them)
    epoch = sum(s.bytes for s in load_shard_index(f"{shards}/shards.json", "train",
                                                  s3["endpoint"]).shards)
    read = [sum(f.stat().st_size for f in (host.local / "cache").glob("*-train/*")
                if f.is_file() and ".lock" not in f.name and ".tmp" not in f.name)
            for host in network.hosts]
    print(f"bytes read per node: {read} of an epoch's {epoch} "
          f"({', '.join(f'{r / epoch:.0%}' for r in read)})")
    assert all(0.3 * epoch < r < 0.6 * epoch for r in read), (read, epoch)


# --- Ray: the head on node1, a worker node on node2 ----------------------------------------------


@pytest.fixture(scope="module")
def ray_two_nodes(network, s3, tmp_path_factory):
    """A Ray cluster of two nodes with one CPU each: a 2-worker group takes one per node.
    Started after the S3 server, so its processes inherit the test credentials."""
    folder = tmp_path_factory.mktemp("ray2")
    node1, node2 = network.hosts
    with contextlib.ExitStack() as stack:
        stack.enter_context(token_auth(folder))
        try:
            cluster = stack.enter_context(ray_head(folder, host=node1, cpus=1))
            worker = stack.enter_context(ray_node(cluster, node2, folder, cpus=1))
        except (RayMissing, ImportError) as e:
            unavailable(str(e))
        yield cluster, worker


def both_nodes_up(ray, node2) -> None:
    """node2 back if a test before took it away for good (it is left so: bringing it back is
    only worth its time to a test that needs it)."""
    if node2.proc is None:
        node2.start()
    wait_until(lambda: len(alive_nodes(ray)) == 2, "two live Ray nodes", every=0.5)


def submit_ray(ray, s3, data: str, name: str, workers: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launchers.ray_submit", "--address", ray.dashboard,
         "--config", DEMO, "--num-workers", workers, "--max-failures", "5",
         # A lost node's lease is taken over once it expires: soon, here.
         *overrides(s3, data, name), "checkpoint.lease_ttl=10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def waiting_for_a_group(ray) -> bool:
    """No Ray Train worker alive, and a placement group waiting for the resources of the next
    one: the controller tore the broken group down and cannot start another."""
    from ray.util.state import list_actors, list_placement_groups

    workers = list_actors(address=ray.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                          ("state", "=", "ALIVE")])
    groups = list_placement_groups(address=ray.dashboard, raise_on_missing_output=False)
    return not workers and any(g.state in ("PENDING", "RESCHEDULING") for g in groups)


def test_ray_group_across_two_nodes_resumes_from_s3_when_a_node_is_lost(
        ray_two_nodes, s3, local_data, one_node_reference):
    ray, node2 = ray_two_nodes
    both_nodes_up(ray, node2)
    proc = submit_ray(ray, s3, local_data, "ray", "2")
    store = CheckpointStore(f"{s3['bucket']}/ray", endpoint_url=s3["endpoint"])
    try:
        wait_for_checkpoint(store, proc, 8)
        try:
            node2.stop()  # the machine is lost: its Ray processes SIGKILLed
            wait_until(lambda: node2.host.address not in alive_nodes(ray), "node2 gone",
                       every=0.5)
            # A group of 2 cannot restart on node1's one CPU: no worker runs while the next
            # group's placement group waits, so nothing trains until node2 is back.
            wait_until(lambda: waiting_for_a_group(ray), "a group waiting for resources",
                       proc=proc, every=0.5)
            assert proc.poll() is None
        finally:
            node2.start()  # the machine comes back and rejoins
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]
    # One worker per node, in the first group and in the restarted one; never a group of one.
    for rank in (0, 1):
        assert output.count(f"ray train worker rank {rank}/2 (local rank 0) ") >= 2, output
    assert "ray train worker rank 0/1 " not in output, output[-5000:]
    assert " on node1" in output and " on node2" in output
    assert "resumed from s3://" in output, output[-5000:]

    assert_ends_like(s3, "ray", one_node_reference, "Ray, two nodes, one lost and back")


def test_an_elastic_ray_group_goes_on_on_one_node_when_the_other_is_lost(
        ray_two_nodes, s3, local_data, one_node_reference):
    ray, node2 = ray_two_nodes
    both_nodes_up(ray, node2)
    proc = submit_ray(ray, s3, local_data, "elastic", "1-2")
    store = CheckpointStore(f"{s3['bucket']}/elastic", endpoint_url=s3["endpoint"])
    try:
        wait_for_checkpoint(store, proc, 8)
        node2.stop()  # lost for good: the group goes on with what is left (both_nodes_up)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]
    assert "ray train worker rank 1/2 (local rank 0) " in output  # first on both nodes
    assert "ray train worker rank 0/1 (local rank 0) " in output  # then on node1 alone
    assert f"batch {BATCH} ({BATCH // 2} x 1 processes x 2 passes)" in output
    assert "resumed from s3://" in output

    assert_ends_like(s3, "elastic", one_node_reference, "Ray, elastic 2 -> 1 workers")

