"""How a run ends when a person or the disk stops it, through the real CLI: Ctrl-C (a real
SIGINT to the process group, as a terminal sends it) saves at the step and exits 130 in one
line; a second Ctrl-C quits at once; a full disk under out_dir (a real tmpfs) drops metrics with
one line and the run trains to its end. No traceback anywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import handles, unavailable, wait_for_checkpoint, wait_until
from test_run_integrity import finish, tiny

from pipeline.storage.checkpoints import CheckpointStore
from pipeline.train.progress import MetricsWriter

EMPTY = Path(__file__).parent / "empty_config.yaml"


def start(overrides: list[str], out: Path) -> subprocess.Popen:
    """`python -m pipeline train` in its own process group (like a terminal's foreground job:
    Ctrl-C signals every process of it, DataLoader workers too), stdout to the file `out`."""
    with out.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config",
                                 str(EMPTY), *overrides], stdout=f, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)


def ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def start_handling_signals(overrides: list[str], out: Path) -> subprocess.Popen:
    """`start`, returned once the CLI's first line has installed the signal handlers (SIGINT's
    goes in first; importing torch and the set-up are still ahead)."""
    proc = start(overrides, out)
    wait_until(lambda: handles(proc.pid, signal.SIGUSR1), "signal handlers", proc=proc)
    return proc


def end(proc: subprocess.Popen, out: Path) -> tuple[int, str, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, out.read_text(), err


@pytest.mark.slow
def test_ctrl_c_saves_at_the_step_exits_130_in_one_line_and_resume_continues(image_folder,
                                                                              tmp_path):
    url = str(tmp_path / "ckpt")
    run = tiny(image_folder, tmp_path / "runs", f"checkpoint.url={url}", "resume=auto",
               "data.workers=1")  # a forked worker gets the Ctrl-C too
    log = tmp_path / "out.txt"
    proc = start([*run, "train.epochs=50"], log)  # 450 steps: the Ctrl-C comes mid-training
    wait_for_checkpoint(url, proc)
    ctrl_c(proc)
    code, out, err = end(proc, log)
    assert code == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert out.count("SIGINT received") == 1, out  # the worker left it to the trainer
    stopped = [line for line in out.splitlines() if "interrupted (SIGINT): checkpoint at step" in
               line]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("checkpoint at step ")[1].split()[0])
    assert CheckpointStore(url).latest_valid().step == step

    epochs = step // 9 + 1  # shorter: to the end of the epoch it stopped in
    code, out, err = finish(subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", str(EMPTY), *run,
         f"train.epochs={epochs}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 0, out + err
    # (a stop at an epoch's last step saves it as that epoch's: "at epoch 0, step 9")
    assert re.search(rf"resumed from {re.escape(url)}/step-{step:08d} at epoch \d+, step "
                     rf"{step}\n", out), out
    assert CheckpointStore(url).latest_valid().step == epochs * 9


@pytest.mark.slow
def test_ctrl_c_while_starting_up_exits_130_in_one_line(image_folder, tmp_path):
    log = tmp_path / "out.txt"
    proc = start_handling_signals(tiny(image_folder, tmp_path / "runs"), log)
    ctrl_c(proc)
    code, out, err = end(proc, log)
    assert code == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert "SIGINT received" in out
    assert "interrupted (SIGINT) before the first step: nothing" in out
    assert "step 3/18" not in out  # it never trained


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once_in_one_line(image_folder, tmp_path):
    log = tmp_path / "out.txt"
    proc = start_handling_signals(tiny(image_folder, tmp_path / "runs"), log)
    ctrl_c(proc)
    wait_until(lambda: "SIGINT received" in log.read_text(), "the first Ctrl-C's line",
               proc=proc)
    ctrl_c(proc)  # still setting up: it would only stop at the first step
    code, out, err = end(proc, log)
    assert code == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert "SIGINT again: quitting now without the checkpoint" in out
    assert "before the first step" not in out  # it did not wait for that


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: a disk that fills up."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode:
        unavailable(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path, leave_pages: int = 0) -> Path:
    """Fill `disk` up to `leave_pages` free pages (the unit tmpfs allocates in)."""
    stat = os.statvfs(disk)
    size = (stat.f_bavail - leave_pages) * stat.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * size)
    assert os.statvfs(disk).f_bavail == leave_pages
    return filler


def test_metrics_on_a_full_disk_are_dropped_with_one_line_and_come_back(small_disk, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.WARNING, logger="pipeline.train")
    metrics = MetricsWriter(small_disk / "run")
    steps = iter(range(1000))
    metrics.write("train", next(steps), {"loss": 1.0, "lr": 0.1})
    filler = fill(small_disk)
    # appends go on in the files' last, part-filled pages; then they fail
    for _ in range(100):
        metrics.write("train", next(steps), {"loss": 1.0, "lr": 0.1, "exits": [1.0, 2.0]})
    assert metrics.dropped > 0
    filler.unlink()
    metrics.write("val", next(steps), {"top1": [50.0, 40.0]})
    metrics.close()

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one when it fails, one when it works again
    assert "No space left on device" in warnings[0] and "training goes on" in warnings[0]
    dropped = int(warnings[1].split("again; ")[1].split()[0])
    # both files hold every record written and nothing of the dropped ones, not half a record
    lines = (small_disk / "run" / "metrics.jsonl").read_text().splitlines()
    written = [json.loads(line)["step"] for line in lines]
    assert len(written) == 102 - dropped and written[-1] == 101
    events = EventAccumulator(str(small_disk / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == written[:-1]
    assert [e.value for e in events.Scalars("val/top1/exit2")] == [40.0]


@pytest.mark.slow
def test_a_full_out_dir_loses_metrics_not_the_training(image_folder, tmp_path, small_disk):
    """out_dir on a disk with 3 free pages: config.yaml takes one, metrics.jsonl and the
    events file one each, and they outgrow them mid-run. Checkpoints go elsewhere."""
    url = str(tmp_path / "ckpt")
    run = tiny(image_folder, small_disk, f"checkpoint.url={url}", "train.epochs=3",
               "train.log_every=1")  # 27 records of ~190 bytes: more than a page
    filler = fill(small_disk, leave_pages=3)
    code, out, err = finish(subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", str(EMPTY), *run],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    assert out.count("cannot write metrics to") == 1 and "No space left on device" in out, out
    assert "step 27/27" in out  # it trained to the end
    assert len(err.strip().splitlines()) == 1, err
    assert "training finished, but" in err and "step 27" in err and url in err, err
    assert CheckpointStore(url).latest_valid().step == 27
    lines = (small_disk / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert 0 < len(lines) < 30 and all(json.loads(line) for line in lines)  # no half record
    assert not (small_disk / "tiny" / "results.json").exists()  # not a half-written one

    filler.unlink()  # what the message says: room again, then resume=auto writes the results
    code, out, err = finish(subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", str(EMPTY), *run, "resume=auto"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 0, out + err
    assert json.loads((small_disk / "tiny" / "results.json").read_text())["exits"]
