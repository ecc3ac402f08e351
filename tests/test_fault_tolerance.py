"""Training against a real S3 server while things go wrong for real: SIGKILL, SIGUSR1, storage
cut off and restored, storage down for good."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_weights, wait_for_checkpoint

from pipeline.storage.checkpoints import CheckpointStore

DEMO = "configs/demo_fmnist_resnet_ann.yaml"
pytestmark = pytest.mark.slow


def run_args(fmnist, out, url, endpoint, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--config", DEMO,
            f"data.root={fmnist}", f"out_dir={out}", "data.batch_size=50", "train.epochs=2",
            "train.log_every=5", f"checkpoint.url={url}", f"checkpoint.endpoint_url={endpoint}",
            "checkpoint.every_steps=4", "checkpoint.retry_delay=0.3", *extra]


def final_weights(url: str, endpoint: str) -> tuple[int, dict]:
    store = CheckpointStore(url, endpoint_url=endpoint)
    state = store.load(store.latest_valid())
    return state["step"], state["model"]


def progress_step(line: str) -> int | None:
    """The step of a progress line (`step 10/40 ...`), else None."""
    match = re.search(r"\bstep (\d+)/\d+", line)
    return int(match[1]) if match else None


def test_sigkill_then_resume_is_bitwise_identical(fmnist, tmp_path, s3_server, s3_bucket):
    whole_url, cut_url = f"{s3_bucket}/whole", f"{s3_bucket}/cut"
    whole = subprocess.run(run_args(fmnist, tmp_path / "a", whole_url, s3_server),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr + whole.stdout

    cut = run_args(fmnist, tmp_path / "b", cut_url, s3_server)
    proc = subprocess.Popen(cut, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = wait_for_checkpoint(cut_url, proc, min_step=8, endpoint=s3_server)
    # Killed once it has trained past that checkpoint (its next progress line): the steps since
    # are lost and trained again; a save in flight then is cut short.
    for line in proc.stdout:
        if (trained := progress_step(line)) is not None and trained > step:
            break
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([*cut, "resume=auto"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from" in resumed.stdout
    resumed_at = int(resumed.stdout.split("step ", 1)[1].split()[0].strip(","))
    assert 8 <= step <= resumed_at < 40

    (step_a, a), (step_b, b) = final_weights(whole_url, s3_server), final_weights(cut_url,
                                                                                   s3_server)
    assert step_a == step_b == 40
    assert_same_weights(a, b)


def test_sigusr1_saves_synchronously_and_exits_75(fmnist, tmp_path, s3_server, s3_bucket):
    url = f"{s3_bucket}/usr1"
    # One epoch of 20 steps: the signal comes at step 5, 15 steps before the end.
    args = run_args(fmnist, tmp_path, url, s3_server, "checkpoint.every_steps=0",
                    "train.epochs=1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until it is training
        if "step 5/20" in line:
            break
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGUSR1)  # a second signal during the save changes nothing
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 75, output
    assert "SIGUSR1 received" in output
    store = CheckpointStore(url, endpoint_url=s3_server)
    latest = store.latest_valid()
    assert latest is not None and 5 <= latest.step < 20 and not latest.meta["end_of_epoch"]
    finished = subprocess.run([*args, "resume=auto"], capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr + finished.stdout
    assert store.latest_valid().step == 20


def test_training_rides_out_a_storage_outage(fmnist, tmp_path, s3_proxy, s3_bucket):
    url = f"{s3_bucket}/outage"
    args = run_args(fmnist, tmp_path, url, s3_proxy.endpoint, "checkpoint.retries=1",
                    "checkpoint.max_failed_saves=50")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(url, proc, min_step=4, endpoint=s3_proxy.endpoint)
    s3_proxy.stop()
    failed = None
    seen = []  # training does not wait for the failing save: it may even reach its end first
    for line in proc.stdout:  # the storage stays away until a save has failed for it
        seen.append(line)
        if "failed" in line and "checkpoint step" in line:
            failed = line
            break
    s3_proxy.start()
    output = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=600) == 0, output
    assert failed is not None  # a save did fail while the storage was away
    assert "step 40/40" in output  # training went on to the end
    store = CheckpointStore(url, endpoint_url=s3_proxy.endpoint)
    # saved again once the storage was back: the last step, after the failed one
    assert store.latest_valid().step == 40 > int(re.search(r"checkpoint step (\d+)", failed)[1])


def test_storage_down_for_good_stops_the_run(fmnist, tmp_path, s3_proxy, s3_bucket):
    url = f"{s3_bucket}/down"
    args = run_args(fmnist, tmp_path, url, s3_proxy.endpoint, "checkpoint.retries=1",
                    "checkpoint.retry_delay=0.1", "checkpoint.max_failed_saves=2")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(url, proc, min_step=4, endpoint=s3_proxy.endpoint)
    s3_proxy.stop()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stdout + stderr
    assert "checkpoint saves in a row" in stderr and "resume=auto" in stderr
    assert "Traceback" not in stderr
    assert "step 40/40" not in stdout  # it stopped instead of training on unprotected


def test_checkpoints_cli_lists_and_verifies(tmp_path, s3_server, s3_bucket):
    url = f"{s3_bucket}/cli"
    store = CheckpointStore(url, endpoint_url=s3_server)
    for step in (5, 10):
        store.save(step, {"w": torch.ones(3) * step}, meta={"epoch": 1})
    cli = [sys.executable, "-m", "pipeline", "checkpoints"]
    listed = subprocess.run([*cli, "list", url, "--endpoint-url", s3_server],
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "step-00000005" in listed.stdout and "step-00000010" in listed.stdout
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    [payload] = [p for p in fs.ls(f"{url[5:]}/step-00000010", detail=False) if ".pt" in p]
    fs.pipe_file(payload, b"garbage")
    verified = subprocess.run([*cli, "verify", url, "--endpoint-url", s3_server, "--json"],
                              capture_output=True, text=True)
    assert verified.returncode == 1
    assert "bytes, the manifest says" in verified.stdout
    assert "AWS_SECRET_ACCESS_KEY" not in verified.stdout + verified.stderr
