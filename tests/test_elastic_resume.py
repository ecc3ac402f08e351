"""Resuming on another number of ranks (issue 14), with real torchrun processes (gloo): a run
interrupted mid-epoch on 2 ranks goes on on 1, then on 2 again, or on 3. The training loader of
these runs writes down the samples it loads (tests/record_ids.py), so the tests check that every
sample of the interrupted epoch is consumed exactly once across the parts, and, with a fixed
global batch, that the losses after the resume are the uninterrupted run's.

The interruption is a real checkpoint of the real run: the run folder copied and cut back to
the checkpoint of the step where it was interrupted (as a preemption after that save leaves it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN, largest_parameter_difference, write_image_folder

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.train.trainer import train

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
DEMO = "configs/demo_fmnist_resnet_ann.yaml"
IMAGES, GLOBAL_BATCH = 96, 12  # 8 steps per epoch, whatever the number of ranks
STEPS_PER_EPOCH = IMAGES // GLOBAL_BATCH
# Per-pass batches of at most 6: 2 ranks x 6; 1 rank x 2 passes of 6; 3 ranks x 4.
SETTINGS = ["data.image_size=32", "data.augment=small", "data.batch_size=6", "data.workers=0",
            f"train.global_batch={GLOBAL_BATCH}", "train.epochs=2", "train.log_every=1",
            "checkpoint.every_steps=2", "checkpoint.keep_last=0", "checkpoint.async_save=false",
            # The per-step parts of the loss: one alternating draw and one AdaLoss update per
            # optimizer step, however many passes make it up.
            "loss.scheme=adaloss", "loss.adaloss_update_every=3", "loss.alternating=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("elastic") / "data",
                              counts={"train": IMAGES // 3, "val": 4})


def run(data: Path, out: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    """The CLI's training on `ranks` torchrun processes; out/ids/rank<N>.jsonl: what each
    rank's training loader loaded."""
    (out / "ids").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", str(HERE / "record_ids.py"),
         "train", "--config", DEMO, f"data.root={data}", f"out_dir={out}", "name=run",
         *SETTINGS, *extra],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "RECORD_IDS_DIR": str(out / "ids")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def cut(source: Path, out: Path, step: int) -> None:
    """out/run: source/run as it was when step `step`'s checkpoint had just been written."""
    shutil.copytree(source / "run", out / "run")
    store = CheckpointStore(str(out / "run" / "checkpoints"))
    for info in store.list():
        if info.step > step:
            shutil.rmtree(out / "run" / "checkpoints" / info.name)
    metrics = out / "run" / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in kept))


def loaded(out: Path, epoch: int, before: int | None = None) -> list[int]:
    """The sample ids all ranks of the run in `out` loaded in `epoch` (at positions < before)."""
    ids = []
    for path in (out / "ids").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == epoch and (before is None or record["consumed"] < before):
                ids += record["ids"]
    return ids


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    """Each step's loss (the mean over the global batch), or another value it logged."""
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if r["kind"] == "train"}


def lrs(out: Path) -> dict[int, float]:
    return losses(out, "lr")


def final(out: Path) -> dict:
    return CheckpointStore(str(out / "run" / "checkpoints")).load_latest_valid()[1]


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    """The uninterrupted run on 2 ranks."""
    out = tmp_path_factory.mktemp("whole")
    proc = run(data, out, 2)
    assert f"batch {GLOBAL_BATCH} (6 x 2 processes)" in proc.stdout
    return out


@pytest.fixture(scope="module")
def two_to_one(data, whole, tmp_path_factory) -> Path:
    """The 2-rank run interrupted at step 10 (2 steps into epoch 2), resumed on 1 rank."""
    out = tmp_path_factory.mktemp("two-to-one")
    cut(whole, out, 10)
    # train.global_batch unset on the resume: the run's own (12) goes on, in 2 passes of 6
    proc = run(data, out, 1, "resume=auto", "train.global_batch=0")
    assert "resumed from" in proc.stdout and "at epoch 1, step 10" in proc.stdout
    assert f"batch {GLOBAL_BATCH} (6 x 1 processes x 2 passes)" in proc.stdout
    return out


def test_two_to_one_consumes_each_sample_once_and_matches_the_uninterrupted_losses(
        whole, two_to_one):
    first_part = loaded(whole, 1, before=2 * GLOBAL_BATCH)
    second_part = loaded(two_to_one, 1)
    assert len(first_part) == 2 * GLOBAL_BATCH and len(second_part) == 6 * GLOBAL_BATCH
    assert sorted(first_part + second_part) == list(range(IMAGES))  # each sample exactly once

    reference, resumed = losses(whole), losses(two_to_one)
    after = range(11, 2 * STEPS_PER_EPOCH + 1)
    assert sorted(k for k in resumed if k > 10) == list(after)
    loss_gap = max(abs(reference[k] - resumed[k]) for k in after)
    weight_gap = largest_parameter_difference(final(whole), final(two_to_one))
    print(f"2 -> 1: largest loss difference {loss_gap:.2e}, largest weight difference "
          f"{weight_gap:.2e}")
    # Floating-point reduction order only (measured: see the print above and README).
    assert loss_gap < 1e-4 and weight_gap < 1e-4
    assert final(two_to_one)["step"] == 2 * STEPS_PER_EPOCH


def test_one_to_two_after_two_to_one(data, whole, two_to_one, tmp_path):
    # The 1-rank part's own checkpoint at step 12, resumed on 2 ranks again.
    cut(two_to_one, tmp_path, 12)
    run(data, tmp_path, 2, "resume=auto")
    parts = (loaded(whole, 1, before=2 * GLOBAL_BATCH),
             loaded(two_to_one, 1, before=4 * GLOBAL_BATCH), loaded(tmp_path, 1))
    assert [len(p) for p in parts] == [24, 24, 48]
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(IMAGES))
    reference, resumed = losses(whole), losses(tmp_path)
    assert max(abs(reference[k] - resumed[k]) for k in range(13, 17)) < 1e-4
    assert final(tmp_path)["step"] == 16 and (tmp_path / "run" / "results.json").is_file()


def test_two_to_three(data, whole, tmp_path):
    cut(whole, tmp_path, 14)  # 6 steps into epoch 2
    proc = run(data, tmp_path, 3, "resume=auto")
    assert f"batch {GLOBAL_BATCH} (4 x 3 processes)" in proc.stdout
    # Rank 2 did not exist: its own seed, logged (a warning: ranks > 0 log nothing less).
    assert "rank 2 did not exist when step 14 was saved" in proc.stdout
    assert "rank 1 did not exist" not in proc.stdout
    first_part, second_part = loaded(whole, 1, before=72), loaded(tmp_path, 1)
    assert len(second_part) == 24
    assert sorted(first_part + second_part) == list(range(IMAGES))
    assert final(tmp_path)["step"] == 16 and (tmp_path / "run" / "results.json").is_file()


def test_a_changed_global_batch_is_refused_in_one_line_unless_allowed(data, whole, tmp_path,
                                                                     caplog):
    cut(whole, tmp_path, 10)
    overrides = [f"data.root={data}", f"out_dir={tmp_path}", "name=run", *SETTINGS,
                 "resume=auto"]
    with pytest.raises(UserError) as refused:
        train(load_config(DEMO, [*overrides, "train.global_batch=6"]))
    message = str(refused.value)
    assert "\n" not in message
    assert "was trained with a global batch of 12; train.global_batch=6 would change it" in message
    assert "leave train.global_batch unset (0) to keep the run's own" in message
    assert "train.allow_batch_change=true" in message

    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        train(load_config(DEMO, [*overrides, "train.global_batch=6",
                                 "train.allow_batch_change=true"]))
    assert "with a global batch of 6 instead of 12 (train.allow_batch_change)" in caplog.text
    # Epoch 2 goes on from its position: 24 of 96 images consumed, 72 left in steps of 6.
    assert final(tmp_path)["step"] == 10 + 72 // 6
    # The lr is scaled to the new batch, at the same point of the schedule: its step 12 (4 + 2
    # of 16 steps into epoch 2) is the reference's step 11 (3 of 8), at half the rate.
    reference, changed = lrs(whole), lrs(tmp_path)
    assert changed[12] == pytest.approx(reference[11] / 2, rel=1e-6)


def test_a_checkpoint_without_data_position_resumes_from_its_step(data, whole, tmp_path):
    # As an older version wrote it: no "data" in the state, no global batch in the meta.
    source = CheckpointStore(str(whole / "run" / "checkpoints"))
    info = next(i for i in source.list() if i.step == 10)
    state = source.load(info)
    del state["data"], state["clock"]
    meta = {k: v for k, v in info.meta.items() if k != "global_batch"}
    CheckpointStore(str(tmp_path / "run" / "checkpoints")).save(10, state, meta)
    proc = run(data, tmp_path, 2, "resume=auto")
    assert "holds no data position (an older version wrote it): epoch 1 goes on from step 10" \
        in proc.stdout
    assert sorted(loaded(whole, 1, before=24) + loaded(tmp_path, 1)) == list(range(IMAGES))
    a, b = final(whole), final(tmp_path)  # the same geometry: the same run, bitwise
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
