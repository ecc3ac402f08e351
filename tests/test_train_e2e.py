"""End to end: the real CLI trains a ResNet-ANN on real Fashion-MNIST JPEGs; checkpoint, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN

from pipeline.config import load_config
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.train.trainer import train

DEMO = "configs/demo_fmnist_resnet_ann.yaml"
pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=600)


def small_run(fmnist: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", DEMO, f"data.root={fmnist}", f"out_dir={out}",
            "data.batch_size=50", "train.log_every=5", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_learns_reports_and_resumes(fmnist, tmp_path):
    run = small_run(fmnist, tmp_path, "train.epochs=3")
    proc = cli(*run)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    run_dir = tmp_path / "demo_fmnist"
    results = json.loads((run_dir / "results.json").read_text())
    exits = results["exits"]
    assert len(exits) == 9 and results["val_samples"] == 1000
    # 1000 real training images, 3 epochs: far better than chance (90% error), and the final
    # exit better than the first.
    assert exits[-1]["top1_error"] < 40, exits
    assert exits[-1]["top1_error"] < exits[0]["top1_error"]
    assert "img/s" in proc.stdout and "eta" in proc.stdout
    assert "top1_err%" in proc.stdout  # the per-exit table
    assert (run_dir / "anytime_curve.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").iterdir())
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1, 2, 3]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(5, 61, 5))
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in train_records)
    assert [c.step for c in CheckpointStore(str(run_dir / "checkpoints")).list()] == [20, 40, 60]

    refused = cli(*run)
    assert refused.returncode == 2
    assert "already holds a run" in refused.stderr and "resume=auto" in refused.stderr

    resumed = cli(*run[:-1], "train.epochs=4", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from" in resumed.stdout and "step 60" in resumed.stdout
    assert [r["epoch"] for r in read_metrics(run_dir) if r["kind"] == "val"] == [1, 2, 3, 4]


def test_resume_continues_exactly_like_an_uninterrupted_run(fmnist, tmp_path):
    overrides = [f"data.root={fmnist}", "data.batch_size=100",
                 "train.epochs=2", "train.log_every=100", "loss.scheme=adaloss",
                 "loss.adaloss_update_every=3"]
    whole = load_config(DEMO, [*overrides, f"out_dir={tmp_path / 'a'}"])
    train(whole)
    # The same run, cut after epoch 1: its epoch-2 checkpoint and log are lost.
    cut = load_config(DEMO, [*overrides, f"out_dir={tmp_path / 'b'}", "resume=auto"])
    shutil.copytree(whole.run_dir, cut.run_dir)
    shutil.rmtree(cut.run_dir / "checkpoints" / "step-00000020")
    train(cut)

    stores = [CheckpointStore(str(c.run_dir / "checkpoints")) for c in (whole, cut)]
    a, b = (s.load(s.latest_valid()) for s in stores)
    assert a["step"] == b["step"] == 20
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a["loss"]["loss_weights"], b["loss"]["loss_weights"])
    assert not torch.equal(a["loss"]["loss_weights"], torch.ones(9))  # adaloss really adapted


def test_ddp_on_two_cpu_processes(fmnist, tmp_path):
    proc = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pipeline",
         *small_run(fmnist, tmp_path, "train.epochs=1", "loss.scheme=adaloss",
                    "loss.adaloss_update_every=4")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.count("training resnet_ann_cifar20") == 1  # rank 1 stays quiet
    assert "batch 100 (50 x 2 processes)" in proc.stdout
    results = json.loads((tmp_path / "demo_fmnist" / "results.json").read_text())
    assert results["val_samples"] == 1000  # both ranks' halves of the validation set
    store = CheckpointStore(str(tmp_path / "demo_fmnist" / "checkpoints"))
    assert store.latest_valid().step == 10  # 1000 images / (50 x 2 ranks)


def test_ddp_resume_restores_each_ranks_random_state(fmnist, tmp_path):
    # Dropout draws from each rank's own generator (seeded seed + rank); a resumed rank must
    # continue its own stream, not rank 0's, for the weights to match an uninterrupted run.
    def run(out: Path, *extra: str) -> None:
        proc = subprocess.run(
            [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pipeline",
             *small_run(fmnist, out, "train.epochs=2", "model.kwargs={drop_rate: 0.5}",
                        "data.workers=0", *extra)],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr + proc.stdout

    run(tmp_path / "whole")
    whole = tmp_path / "whole" / "demo_fmnist"
    cut = tmp_path / "cut" / "demo_fmnist"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000020")  # cut after epoch 1
    run(tmp_path / "cut", "resume=auto")

    a, b = (CheckpointStore(str(d / "checkpoints")).load_latest_valid()[1] for d in (whole, cut))
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])
    assert a["step"] == b["step"] == 20
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_corrupt_jpegs_are_skipped_and_counted(fmnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fmnist, data)
    victim = sorted((data / "train").glob("*/*.JPEG"))[7]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated mid-stream
    # Also runs the options no other test trains with: gradient clipping and channels_last.
    proc = cli(*small_run(data, tmp_path, "train.epochs=1", "optim.grad_clip=0.5",
                          "train.channels_last=true"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert victim.name in proc.stdout + proc.stderr
    [record] = [r for r in read_metrics(tmp_path / "demo_fmnist") if r["kind"] == "val"]
    assert record["bad_images"] == 1


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "train"),
    ("empty_class", "holds no images"),
])
def test_bad_data_folders_fail_with_one_clear_line(tmp_path, fmnist, setup, message):
    data = tmp_path / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "empty_class":
        shutil.copytree(fmnist, data)
        for f in (data / "train" / sorted(p.name for p in (data / "train").iterdir())[3]).iterdir():
            f.unlink()
    proc = cli(*small_run(data, tmp_path, "train.epochs=1"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


