"""prepare: real idx files and sklearn digits -> real JPEG folders in the ImageNet layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import unavailable
from PIL import Image

from pipeline.data.listing import check_same_classes, index_split
from pipeline.data.prepare import (
    COMPLETE_MARKER,
    FASHION_MNIST_SOURCE,
    prepare_digits,
    prepare_fashion_mnist,
)
from pipeline.errors import UserError


@pytest.fixture
def fashion_mnist_source() -> None:
    """The Debian package's idx files, which the tests convert."""
    if not (FASHION_MNIST_SOURCE / "train-images-idx3-ubyte.gz").is_file():
        unavailable("needs Debian's dataset-fashion-mnist (make install)")


needs_fmnist = pytest.mark.usefixtures("fashion_mnist_source")


@needs_fmnist
def test_fashion_mnist_limit_writes_decodable_jpegs_of_all_classes(tmp_path: Path) -> None:
    out = tmp_path / "fmnist"
    summary = prepare_fashion_mnist(out, limit=50)

    assert summary["counts"] == {"train": 50, "val": 50}
    assert summary["skipped"] is False
    train, val = index_split(out, "train"), index_split(out, "val")
    check_same_classes(train, val)
    assert train.classes == summary["classes"]
    assert len(train.classes) == 10
    assert train.classes[0] == "0_tshirt_top" and train.classes[9] == "9_ankle_boot"
    assert len(train) == 50 and len(val) == 50
    # limit spreads the images over the classes: 5 per class
    assert np.bincount(train.labels).tolist() == [5] * 10
    for i in (0, 17, 49):
        path = train.path(i)
        assert path.suffix == ".JPEG"
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.size == (28, 28)
            pixels = np.asarray(im.convert("L"), dtype=np.float32)
        assert pixels.std() > 10  # a real garment, not a blank image
    assert not list(tmp_path.glob("fmnist.tmp-*"))  # the temporary folder was renamed away


@needs_fmnist
def test_fashion_mnist_labels_match_the_idx_file(tmp_path: Path) -> None:
    import gzip

    out = tmp_path / "fmnist"
    prepare_fashion_mnist(out, limit=20)
    with gzip.open(FASHION_MNIST_SOURCE / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    val = index_split(out, "val")
    for rel, label in val.samples():
        image_number = int(Path(rel).stem)  # files are named by their index in the idx file
        assert labels[image_number] == label


@needs_fmnist
def test_fashion_mnist_is_idempotent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "fmnist"
    prepare_fashion_mnist(out, limit=20)
    first = sorted(p.relative_to(out) for p in out.rglob("*"))
    stamp = (out / COMPLETE_MARKER).stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="pipeline.data.prepare"):
        again = prepare_fashion_mnist(out, limit=20)

    assert again["skipped"] is True
    assert again["counts"] == {"train": 20, "val": 20}
    assert "skipping" in caplog.text
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == first
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"limit.*remove it or choose another --out"):
        prepare_fashion_mnist(out, limit=30)


def test_fashion_mnist_missing_source_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        prepare_fashion_mnist(tmp_path / "out", source=tmp_path / "nowhere", limit=10)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "prepare digits" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_incomplete_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    (out / "train" / "0_zero").mkdir(parents=True)  # what an interrupted copy might leave
    with pytest.raises(UserError, match=r"not a complete prepared data set.*remove it"):
        prepare_digits(out)


def test_empty_output_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    out.mkdir()
    assert prepare_digits(out)["counts"]["train"] > 0
    assert (out / COMPLETE_MARKER).is_file()


def test_digits(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    summary = prepare_digits(out, val_fraction=0.2, seed=0)

    assert summary["counts"]["train"] + summary["counts"]["val"] == 1797
    assert summary["counts"]["val"] == pytest.approx(0.2 * 1797, abs=1)
    train, val = index_split(out, "train"), index_split(out, "val")
    check_same_classes(train, val)
    assert len(train.classes) == 10
    assert train.classes[0] == "0_zero" and train.classes[9] == "9_nine"
    # stratified: every class has about a fifth of its images in val
    val_counts = np.bincount(val.labels, minlength=10)
    assert val_counts.min() >= 30 and val_counts.max() <= 40
    # train and val are disjoint
    names = [{Path(r).name for r, _ in index.samples()} for index in (train, val)]
    assert not names[0] & names[1]
    with Image.open(val.path(0)) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
        assert np.asarray(im).max() > 200  # scaled from 0..16 up to 0..255
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["counts"] == summary["counts"]


def test_digits_split_is_deterministic(tmp_path: Path) -> None:
    a = list(index_split(prepare_digits(tmp_path / "a", seed=3)["out"], "val").samples())
    b = list(index_split(prepare_digits(tmp_path / "b", seed=3)["out"], "val").samples())
    c = list(index_split(prepare_digits(tmp_path / "c", seed=4)["out"], "val").samples())
    assert a == b
    assert a != c


def test_digits_bad_fraction(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="val_fraction"):
        prepare_digits(tmp_path / "d", val_fraction=1.5)
