"""The SLURM launchers against a real one-node cluster (slurmctld + slurmd + munged on
127.0.0.1): slurm/train.sh through sbatch and launchers/submitit_train.py through submitit. A run
is signalled with SIGUSR1 mid-training, checkpoints to the real S3 server, requeues itself,
resumes, and ends with the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_weights, largest_parameter_difference, write_image_folder
from slurm_cluster import wait_for_line

from pipeline.storage.checkpoints import CheckpointStore

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo_fmnist_resnet_ann.yaml"
# A global batch of 8 in passes of 4: one process accumulates 2, two processes take one each;
# the same batches either way (pipeline/data/sampler.py), so a job may change its task count.
TRAIN_IMAGES, BATCH, EPOCHS = 3 * 100, 8, 2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 100 training JPEGs: 37 steps per epoch at batch 8, a few seconds on a CPU."""
    return write_image_folder(tmp_path_factory.mktemp("slurm-data") / "data",
                              counts={"train": TRAIN_IMAGES // 3, "val": 4})


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    import s3fs

    name = f"slurm-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(name)
    return f"s3://{name}"


def overrides(data: Path, out: Path, name: str, url: str, endpoint: str) -> list[str]:
    return [f"data.root={data}", "data.image_size=32", "data.augment=small",
            f"train.global_batch={BATCH}", f"data.batch_size={BATCH // 2}", "data.workers=0",
            f"train.epochs={EPOCHS}",
            "train.log_every=1", "train.amp=none", f"name={name}", f"out_dir={out}",
            f"checkpoint.url={url}", f"checkpoint.endpoint_url={endpoint}",
            "checkpoint.retry_delay=0.3"]


def sbatch_train(cluster, out: Path, name: str, args: list[str], *sbatch_args: str) -> str:
    return cluster.sbatch([*sbatch_args, f"--output={out}/{name}-%j.out", "slurm/train.sh", DEMO,
                           *args], cwd=REPO, env={"PYTHON": sys.executable})


def final_state(url: str, endpoint: str) -> dict:
    store = CheckpointStore(url, endpoint_url=endpoint)
    return store.load(store.latest_valid())


def assert_ends_like(a: dict, b: dict) -> None:
    """Two final checkpoints' states: the same last step, the same weights bit for bit."""
    assert a["step"] == b["step"] == EPOCHS * (TRAIN_IMAGES // BATCH)
    assert_same_weights(a["model"], b["model"])


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tiny_data, bucket, s3_server, tmp_path_factory) -> dict:
    """One uninterrupted sbatch run, submitted once and shared: the tests compare with it."""
    out = tmp_path_factory.mktemp("reference")
    url = f"{bucket}/reference"
    job_id = sbatch_train(slurm_cluster, out, "reference",
                         overrides(tiny_data, out, "reference", url, s3_server))
    return {"job_id": job_id, "url": url, "out": out}


def finished_reference(cluster, reference_run: dict) -> dict:
    info = cluster.wait(reference_run["job_id"], "COMPLETED", timeout=300)
    assert info["Restarts"] == "0"
    results = json.loads((reference_run["out"] / "reference" / "results.json").read_text())
    return {**reference_run, "results": results}


@pytest.mark.slow
def test_sbatch_usr1_checkpoints_requeues_and_matches_uninterrupted_run(
        slurm_cluster, reference_run, tiny_data, s3_server, bucket, tmp_path):
    url = f"{bucket}/cut"
    job_id = sbatch_train(slurm_cluster, tmp_path, "cut",
                          overrides(tiny_data, tmp_path, "cut", url, s3_server))
    log = tmp_path / f"cut-{job_id}.out"
    wait_for_line(log, "step 10/")
    # To the batch shell only: slurm/common.sh forwards it through srun to the trainer. Then
    # straight to the trainer as well: a second signal during the save changes nothing.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)

    info = slurm_cluster.wait(job_id, "COMPLETED", timeout=300)
    text = log.read_text()
    assert info["Restarts"] == "1", text
    assert "batch shell got SIGUSR1: forwarding" in text  # common.sh's trap ran
    assert "SIGUSR1 received" in text and "Exited with exit code 75" in text
    assert "preempted (exit 75): requeueing" in text
    assert f"job {job_id} start 2" in text  # same job id, same (appended) log
    resumed_at = int(text.split("resumed from", 1)[1].split("step ")[1].split()[0])
    assert 10 <= resumed_at < EPOCHS * (TRAIN_IMAGES // BATCH)

    reference = finished_reference(slurm_cluster, reference_run)
    reference_log = reference["out"] / f"reference-{reference['job_id']}.out"
    assert "preempted" not in reference_log.read_text()
    assert_ends_like(final_state(url, s3_server), final_state(reference["url"], s3_server))
    results = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert results["exits"] == reference["results"]["exits"]


@pytest.mark.slow
def test_submitit_usr1_requeues_through_checkpointable_and_matches(
        slurm_cluster, reference_run, tiny_data, s3_server, bucket, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="needs submitit: pip install '.[slurm]'")
    from launchers.submitit_train import submit_training

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    url = f"{bucket}/submitit"
    job = submit_training(DEMO, overrides(tiny_data, tmp_path, "submitit", url, s3_server),
                          folder=tmp_path / "submitit" / "%j", cpus_per_task=1,
                          timeout_min=30, signal_delay_s=60)
    log = Path(job.paths.stdout)
    wait_for_line(log, "step 10/")
    slurm_cluster.run("scancel", "--signal=USR1", job.job_id)  # every task of the job's steps

    info = slurm_cluster.wait(job.job_id, "COMPLETED", timeout=300)
    results = job.result()  # the resubmitted call's return value
    text = log.read_text()
    assert info["Restarts"] == "1", text
    assert "Calling checkpoint method" in text and f"Requeued job {job.job_id}" in text
    assert "resumed from" in text

    reference = finished_reference(slurm_cluster, reference_run)
    assert results["exits"] == reference["results"]["exits"]
    assert_ends_like(final_state(url, s3_server), final_state(reference["url"], s3_server))


@pytest.mark.slow
def test_sbatch_two_tasks_requeued_on_one_go_on_where_they_stopped(
        slurm_cluster, reference_run, tiny_data, s3_server, bucket, tmp_path):
    finished_reference(slurm_cluster, reference_run)  # both CPUs of the node are needed here
    url = f"{bucket}/ddp"
    # train.global_batch unset, as most configs leave it: the first start makes it BATCH
    # (BATCH // 2 x 2 tasks), and the requeue onto one task keeps the run's own.
    args = [a for a in overrides(tiny_data, tmp_path, "ddp", url, s3_server)
            if not a.startswith("train.global_batch=")]
    job_id = sbatch_train(slurm_cluster, tmp_path, "ddp", args, "--ntasks=2")
    log = tmp_path / f"ddp-{job_id}.out"
    wait_for_line(log, "step 10/")
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    # slurm/common.sh requeues the job; it waits a few seconds (BeginTime) before it may start
    # again: time to shrink it to one task, as a cluster with less room would start it.
    deadline = time.monotonic() + 120
    while (info := slurm_cluster.job(job_id))["Restarts"] != "1" or \
            info["JobState"] != "PENDING":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "NumTasks=1", "NumCPUs=1")

    info = slurm_cluster.wait(job_id, "COMPLETED", timeout=300)
    text = log.read_text()
    assert info["Restarts"] == "1", text
    # One process group of two ranks (gloo on the CPU), then one process accumulating 2 passes.
    assert f"job {job_id} start 1: 1 node(s), 2 task(s)" in text
    assert f"job {job_id} start 2: 1 node(s), 1 task(s)" in text
    assert f"batch {BATCH} ({BATCH // 2} x 2 processes)" in text
    assert f"batch {BATCH} ({BATCH // 2} x 1 processes x 2 passes)" in text
    assert text.count("preempted (SIGUSR1): checkpoint at step") == 2  # both ranks, same step
    assert "resumed from" in text

    # Ends like the uninterrupted one-task job, up to floating-point reduction order.
    reference = finished_reference(slurm_cluster, reference_run)
    a, b = final_state(url, s3_server), final_state(reference["url"], s3_server)
    assert a["step"] == b["step"] == EPOCHS * (TRAIN_IMAGES // BATCH)
    gap = largest_parameter_difference(a, b)
    print(f"2 tasks -> 1 task: largest weight difference to the uninterrupted job {gap:.2e}")
    assert gap < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["--config", DEMO, "train.epochz=2"], "did you mean train.epochs?"),
])
def test_submitit_cli_refuses_bad_input_before_submitting(args, message, capsys, monkeypatch):
    # main(ARGS) in this process: a subprocess pays torch's import for each refusal. main is
    # wrapped in errors.cli_main, whose command line test_config.py runs as `python -m pipeline`
    from launchers.submitit_train import main

    monkeypatch.chdir(REPO)
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("env, layout", [
    # --nodes=1-2 --gpus-per-node=4 that got 2 nodes: one task per GPU on each
    ({"SLURM_TASKS_PER_NODE": "1(x2)"}, "2 4 -> 8 4"),
    ({"SLURM_NTASKS_PER_NODE": "2"}, "3 0 -> 6 2"),  # --ntasks-per-node=2 on 3 nodes
    ({"SLURM_TASKS_PER_NODE": "2,1"}, "2 0 -> 3"),  # --ntasks=3 on 2 nodes, unevenly
    ({"SLURM_TASKS_PER_NODE": "1", "SLURM_NTASKS": "2"}, "1 0 -> 1"),  # shrunk by scontrol
])
def test_common_sh_takes_the_task_layout_of_this_start(env, layout):
    nodes, gpus = layout.split(" -> ")[0].split()
    done = subprocess.run(["bash", "-c", f"source slurm/common.sh && task_layout {nodes} {gpus}"],
                          cwd=REPO, env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == layout.split(" -> ")[1], done.stderr


def test_common_sh_refuses_gpus_without_one_task_each(tmp_path):
    # What a job sees with --gpus-per-node=4 --ntasks-per-node=1; stops before srun.
    env = {"PATH": os.environ["PATH"], "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1",
           "CONFIG": DEMO}
    done = subprocess.run(["bash", "-c", "source slurm/common.sh && launch_training"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--ntasks-per-node=4" in done.stderr
