"""The data set a run was trained on is part of its checkpoint (meta "dataset": the class list, the
training images per class, a digest of their file names): a resume, `eval` and `assemble` on a data
set with other classes stop in one line naming the difference; a resume on other training images
stops too, unless data.allow_sample_change=true. Real folders of real JPEGs, the real trainer."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder

from pipeline.config import load_config
from pipeline.data.index import DataIdentity
from pipeline.data.listing import index_split
from pipeline.errors import UserError
from pipeline.storage.checkpoints import MANIFEST, CheckpointStore
from pipeline.train.trainer import train

# 3 classes x 12 training images, batch 4: 9 steps an epoch, checkpoints at steps 3, 6 and 9.
TINY = ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 4}", "data.image_size=32",
        "data.augment=small", "data.batch_size=4", "data.workers=0", "train.epochs=1",
        "train.log_every=3", "checkpoint.every_steps=3", "checkpoint.async_save=false",
        "name=tiny"]


def run(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"out_dir={out}", *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, out_dir) of one finished tiny run, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("identity")
    data = write_image_folder(base / "data")
    train(load_config(None, run(data, base / "runs")))
    return data, base / "runs"


def variant(data: Path, where: Path, edit) -> Path:
    """A copy of the data folder, changed by `edit(copy)`."""
    copy = where / "data-variant"
    shutil.copytree(data, copy)
    edit(copy)
    return copy


def rename_class(old: str, new: str):
    def edit(root: Path) -> None:
        for split in ("train", "val"):
            (root / split / old).rename(root / split / new)
    return edit


def resume_refusal(data: Path, out: Path, *extra: str) -> str:
    with pytest.raises(UserError) as err:
        train(load_config(None, run(data, out, "resume=auto", *extra)))
    message = str(err.value)
    assert "\n" not in message, message
    return message


def manifest_of(out: Path, step: int) -> Path:
    return out / "tiny" / "checkpoints" / f"step-{step:08d}" / MANIFEST


# --- the identity itself ------------------------------------------------------------------------


def test_identity_names_what_changed(tmp_path):
    data = write_image_folder(tmp_path / "data")
    identity = index_split(data, "train").identity()
    assert identity.classes == ("ant", "bee", "cat") and identity.images_per_class == (12, 12, 12)
    # a moved copy is the same data set, and the record survives JSON (a manifest's meta)
    moved = index_split(shutil.copytree(data, tmp_path / "moved"), "train").identity()
    assert moved == identity
    assert DataIdentity.from_meta(json.loads(json.dumps(identity.to_meta()))) == identity
    assert identity.class_change(identity) is None and identity.sample_change(identity) is None

    (data / "train" / "bee" / "bee_003.JPEG").rename(data / "train" / "bee" / "bee_x.JPEG")
    renamed = index_split(data, "train").identity()
    assert renamed.class_change(identity) is None
    assert renamed.sample_change(identity) == "the same classes and counts, other file names"

    for i in range(2):
        (data / "train" / "bee" / f"bee_{i:03d}.JPEG").unlink()
    fewer = index_split(data, "train").identity()
    assert fewer.sample_change(identity) == ("class 'bee' has 10 training images, the "
                                             "checkpoint's data had 12 (34 in all, the "
                                             "checkpoint's 36)")

    shutil.rmtree(data / "train" / "cat")
    (data / "train" / "ant").rename(data / "train" / "zebra")
    other = index_split(data, "train").identity()
    assert other.class_change(identity) == ("only in the checkpoint: 'ant', 'cat'; only in "
                                            "data.root: 'zebra'")


@pytest.mark.parametrize("value, words", [
    ("ant", "not an object"),
    ({"classes": ["a"], "images_per_class": [1]}, "lacks files_sha256"),
    ({"classes": "ab", "images_per_class": [1, 1], "files_sha256": "0" * 64}, "classes"),
    ({"classes": ["a", 3], "images_per_class": [1, 1], "files_sha256": "0" * 64}, "classes"),
    ({"classes": ["a", "b"], "images_per_class": [1], "files_sha256": "0" * 64},
     "images_per_class"),
    ({"classes": ["a"], "images_per_class": [-1], "files_sha256": "0" * 64}, "images_per_class"),
    ({"classes": ["a"], "images_per_class": [True], "files_sha256": "0" * 64},
     "images_per_class"),
    ({"classes": ["a"], "images_per_class": [1], "files_sha256": "xyz"}, "files_sha256"),
])
def test_a_malformed_record_is_a_value_error_naming_the_field(value, words):
    with pytest.raises(ValueError, match=words):
        DataIdentity.from_meta(value)


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_on_a_renamed_class_folder_is_refused_in_one_line(trained, tmp_path):
    data, out = trained
    # ant -> zebra moves every class's position: bee 1 -> 0, cat 2 -> 1, zebra 2
    renamed = variant(data, tmp_path, rename_class("ant", "zebra"))
    message = resume_refusal(renamed, out)
    assert "only in the checkpoint: 'ant'; only in data.root: 'zebra'" in message, message
    assert "name=NEW_NAME" in message and "step-00000009" in message


@pytest.mark.slow
def test_resume_with_a_class_removed_from_both_splits_is_one_line_without_traceback(trained,
                                                                                    tmp_path):
    data, out = trained

    def remove_cat(root: Path) -> None:
        for split in ("train", "val"):
            shutil.rmtree(root / split / "cat")

    fewer = variant(data, tmp_path, remove_cat)
    empty = Path(__file__).parent / "empty_config.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(empty),
                           *run(fewer, out, "resume=auto")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "only in the checkpoint: 'cat'; only in data.root: none" in proc.stderr


@pytest.mark.slow
def test_resume_on_other_training_images_is_refused_unless_allowed(trained, tmp_path, caplog):
    data, out = trained

    def drop_two_bees(root: Path) -> None:
        for i in range(2):
            (root / "train" / "bee" / f"bee_{i:03d}.JPEG").unlink()

    fewer = variant(data, tmp_path, drop_two_bees)
    message = resume_refusal(fewer, out)
    assert "class 'bee' has 10 training images, the checkpoint's data had 12" in message
    assert "data.allow_sample_change=true" in message

    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    (renamed / "train" / "cat" / "cat_000.JPEG").rename(renamed / "train" / "cat" / "cat_x.JPEG")
    assert "the same classes and counts, other file names" in resume_refusal(renamed, out)

    # Allowed: from the mid-epoch checkpoint (step 6, 24 of 36 images consumed), the epoch goes
    # on in the new order of 34 images: 8 steps of 4, so 2 more.
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    shutil.rmtree(manifest_of(copy, 9).parent)
    caplog.set_level(logging.INFO)
    train(load_config(None, run(fewer, copy, "resume=auto", "data.allow_sample_change=true")))
    assert "class 'bee' has 10 training images" in caplog.text  # said as a warning
    info = CheckpointStore(str(copy / "tiny" / "checkpoints")).latest_valid()
    assert info.step == 8 and info.meta["dataset"]["images_per_class"] == [12, 10, 12]
    # the checkpoint now records the new data: the next resume needs no override
    train(load_config(None, run(fewer, copy, "resume=auto")))


@pytest.mark.slow
def test_older_and_malformed_records(trained, tmp_path, caplog):
    data, out = trained
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    path = manifest_of(copy, 9)
    manifest = json.loads(path.read_text())

    manifest["meta"]["dataset"] = {"classes": "ant bee cat"}  # a bucket is untrusted
    path.write_text(json.dumps(manifest))
    message = resume_refusal(data, copy)
    assert "meta.dataset" in message and "data.allow_sample_change=true" in message, message
    caplog.set_level(logging.INFO)
    train(load_config(None, run(data, copy, "resume=auto", "data.allow_sample_change=true")))
    assert "without checking its data" in caplog.text

    del manifest["meta"]["dataset"]  # written before checkpoints recorded their data
    path.write_text(json.dumps(manifest))
    caplog.clear()
    train(load_config(None, run(data, copy, "resume=auto")))
    assert "records no data set" in caplog.text
    # ... and one with another number of classes still stops in one line
    without_cat = tmp_path / "two-classes"
    shutil.copytree(data, without_cat)
    for split in ("train", "val"):
        shutil.rmtree(without_cat / split / "cat")
    message = resume_refusal(without_cat, copy)
    assert "2 classes" in message and "does not fit" in message, message


# --- eval and assemble --------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_and_assemble_on_other_classes_are_one_line(trained, tmp_path):
    from pipeline.eann.assemble import assemble
    from pipeline.evaluation import evaluate_checkpoint

    data, out = trained
    renamed = variant(data, tmp_path, rename_class("ant", "zebra"))  # still 3 classes
    checkpoints = str(out / "tiny" / "checkpoints")
    for call in (lambda: evaluate_checkpoint(checkpoints, str(renamed), device="cpu",
                                             out_dir=tmp_path / "eval"),
                 lambda: assemble([checkpoints], str(renamed), str(tmp_path / "eann"),
                                  device="cpu")):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert "only in the checkpoint: 'ant'; only in the data: 'zebra'" in message, message
        assert "\n" not in message
