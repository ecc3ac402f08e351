"""Ray Train and Ray Jobs against a real local Ray cluster (`ray start --head`, 2 CPUs, gloo),
checkpointing to the real S3 test server: a worker SIGKILLed mid-training, a job submitted
through the dashboard's job server, a user error inside a worker."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import unavailable, wait_for_checkpoint
from ray_cluster import RayCluster, RayMissing, ray_head, token_auth

from pipeline.storage.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow
DEMO = "configs/demo_fmnist_resnet_ann.yaml"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[RayCluster]:
    """A one-node cluster on 127.0.0.1 with 2 CPUs and the dashboard (for Ray Jobs). Started
    after the S3 server, so its workers inherit the test credentials from the environment."""
    # A short temp dir: Ray's unix sockets live there.
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp",
                                     ignore_cleanup_errors=True) as temp_dir, \
            token_auth(Path(temp_dir)):
        try:
            import ray.job_submission
            import ray.train  # noqa: F401
        except ImportError as e:
            unavailable(f"Ray is not installed ({e}): pip install 'anytime-pipeline[ray]'")
        with contextlib.ExitStack() as stack:
            try:
                cluster = stack.enter_context(ray_head(Path(temp_dir)))
            except RayMissing as e:
                unavailable(str(e))
            yield cluster


def tiny_overrides(data: Path, out: Path, url: str, endpoint: str, epochs: int) -> list[str]:
    """A 3-exit ResNet-ANN on 32x32 JPEGs, checkpoints every 2 steps to the S3 server."""
    return [f"data.root={data}", "data.image_size=32", "data.batch_size=4", "data.workers=0",
            "model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 8}",
            "train.amp=none", "train.device=cpu", f"train.epochs={epochs}", "train.log_every=2",
            f"out_dir={out}", f"checkpoint.url={url}", f"checkpoint.endpoint_url={endpoint}",
            "checkpoint.every_steps=2", "checkpoint.retry_delay=0.3"]


def steps_per_epoch(train_images: int, workers: int = 2, batch: int = 4) -> int:
    return train_images // workers // batch  # the sampler splits evenly, the last batch drops


def alive_train_workers(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                     ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_restarts_the_group_which_resumes_from_s3(
        ray_cluster, make_image_folder, tmp_path, s3_server, s3_bucket):
    data = make_image_folder(counts={"train": 24, "val": 4})
    url, epochs = f"{s3_bucket}/killed/checkpoints", 6
    total = epochs * steps_per_epoch(3 * 24)  # 6 x 9 = 54 steps
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.ray_train", "--config", DEMO, "--num-workers", "2",
         "--max-failures", "1", "--address", ray_cluster.address,
         *tiny_overrides(data, tmp_path / "runs", url, s3_server, epochs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    store = CheckpointStore(url, endpoint_url=s3_server)
    try:
        wait_for_checkpoint(store, proc, 4, timeout=180)
        victims = alive_train_workers(ray_cluster.dashboard)
        assert len(victims) == 2
        os.kill(victims[-1], signal.SIGKILL)  # a real crash: no handler, no goodbye
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Error count: 1 (max allowed: 1)" in output  # Ray's failure policy: one restart
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, output
    resumed_at = int(resumed[0].split("step ")[-1])
    assert 4 <= resumed_at < total  # mid-run, from a checkpoint the first group wrote
    final = store.latest_valid()
    assert final.step == total and final.meta["epoch"] == epochs
    assert victims[-1] not in alive_train_workers(ray_cluster.dashboard)
    assert f"newest checkpoint: {url}/step-{total:08d}" in output
    # Ray's run state went to the same bucket, next to the checkpoints.
    assert store.fs.exists(f"{store.root}/ray")


def test_ray_job_submission_runs_to_the_end_and_its_logs_are_kept(
        ray_cluster, make_image_folder, tmp_path, s3_server, s3_bucket):
    from ray.job_submission import JobSubmissionClient

    data = make_image_folder(counts={"train": 8, "val": 4})
    url = f"{s3_bucket}/job/checkpoints"
    proc = subprocess.run(
        [sys.executable, "-m", "launchers.ray_submit", "--address", ray_cluster.dashboard,
         "--config", DEMO, "--num-workers", "2",
         *tiny_overrides(data, tmp_path / "runs", url, s3_server, epochs=2)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted Ray job ", 1)[1].split()[0]
    assert proc.stdout.rstrip().endswith(f"Ray job {job_id} SUCCEEDED")

    client = JobSubmissionClient(ray_cluster.dashboard)
    assert client.get_job_status(job_id) == "SUCCEEDED"
    logs = client.get_job_logs(job_id)  # kept by the cluster after the job ended
    assert "per-exit validation error of demo_fmnist" in logs
    assert "'final_exit_top1_error'" in logs  # each epoch's errors were reported to Ray
    total = 2 * steps_per_epoch(3 * 8)
    assert CheckpointStore(url, endpoint_url=s3_server).latest_valid().step == total
    # The job ran in an uploaded copy of the checkout; the run folder is where we said.
    assert (tmp_path / "runs" / "demo_fmnist" / "results.json").is_file()


def test_a_user_error_in_the_workers_is_one_line_and_exit_2(ray_cluster, tmp_path, s3_server,
                                                            s3_bucket):
    proc = subprocess.run(
        [sys.executable, "-m", "launchers.ray_train", "--config", DEMO, "--num-workers", "1",
         "--max-failures", "0", "--address", ray_cluster.address,
         *tiny_overrides(tmp_path / "nowhere", tmp_path / "runs", f"{s3_bucket}/x", s3_server,
                         epochs=1)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Ray forwards the workers' own logs (and tracebacks) too; the launcher says one line.
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: data root") and "nowhere" in line
    assert line.endswith("(on a Ray Train worker)")


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.ray_submit", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def submit_here(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """launchers.ray_submit's main(ARGS) in this process (a subprocess pays torch's and Ray's
    imports, ~5 s on CI, for each refusal): its exit code and stderr. The command line itself
    runs in the tests above and below."""
    try:
        import ray.job_submission  # noqa: F401
    except ImportError as e:
        unavailable(f"Ray is not installed ({e}): pip install 'anytime-pipeline[ray]'")
    from launchers.ray_submit import main

    monkeypatch.chdir(REPO)
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def test_submit_checks_the_config_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    code, err = submit_here(capsys, monkeypatch, "--address", "http://127.0.0.1:1",
                            "--config", DEMO, "train.epochz=3")
    assert code == 2 and "did you mean train.epochs?" in err, err
    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(REPO / DEMO, outside)
    code, err = submit_here(capsys, monkeypatch, "--address", "http://127.0.0.1:1",
                            "--config", str(outside))
    assert code == 2 and "outside --working-dir" in err, err
    code, err = submit_here(capsys, monkeypatch, "--address", "http://127.0.0.1:1",
                            "--config", DEMO)  # nobody listens
    assert code == 2
    assert err.startswith("error: cannot reach the Ray cluster at http://127.0.0.1:1"), err


@pytest.mark.parametrize("args, message", [
    (["--num-workers", "1-2"], "--num-workers 1-2 lets Ray change the group's size, which would "
                               "change the global batch: set train.global_batch (e.g. 256"),
    (["--num-workers", "2-4", "train.global_batch=8"],
     "train.global_batch=8 does not split over 3 workers, sizes --num-workers 2-4 allows"),
    (["--num-workers", "3-1"], "'3-1': need 1 <= MIN <= MAX"),
    (["--num-workers", "two"], "'two': give N or MIN-MAX, e.g. 2 or 1-4"),
])
def test_submit_refuses_an_elastic_group_that_would_change_the_batch(args, message, capsys,
                                                                     monkeypatch):
    code, err = submit_here(capsys, monkeypatch, "--address", "http://127.0.0.1:1",
                            "--config", DEMO, *args)
    assert code == 2 and message in err, err


def test_submit_refuses_a_bad_value_before_contacting_the_cluster(capsys, monkeypatch):
    code, err = submit_here(capsys, monkeypatch, "--address", "http://127.0.0.1:1",
                            "--config", DEMO, "optim.lr=-0.1")
    assert code == 2
    assert err.startswith("error: optim.lr=-0.1 must be a finite number > 0"), err
    assert err.count("\n") == 1


def test_submit_without_the_clusters_token_says_how_to_give_it(ray_cluster):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = submit("--address", ray_cluster.dashboard, "--config", DEMO, env=env)
    assert proc.returncode == 2
    assert "token authentication" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
