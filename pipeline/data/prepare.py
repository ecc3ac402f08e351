"""Converters from small real data sets to the ImageNet folder layout, so the CPU demo and the tests
exercise exactly the code path a real ImageNet run takes:

    out/{train,val}/<class>/<name>.JPEG

A prepare writes into a sibling `out.tmp-XXXX` folder, puts a `.complete` marker (the summary as
JSON) in it last, and renames it to `out`: an interrupted prepare never leaves a folder at `out`
that looks finished. Running it again on a complete `out` with the same arguments does nothing.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]  # fmt: skip
DIGITS_CLASSES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]  # fmt: skip
COMPLETE_MARKER = ".complete"
JPEG_QUALITY = 90
# Below this many images a process pool costs more to start than it saves.
_POOL_MIN_IMAGES = 4000
_CHUNK = 2000  # images per pool task


def prepare_fashion_mnist(
    out: Path, source: Path = FASHION_MNIST_SOURCE, limit: int | None = None
) -> dict[str, Any]:
    """Fashion-MNIST's idx files -> out/{train,val}/<i_class>/<n>.JPEG (train 60k, val = t10k 10k).

    `limit` keeps at most that many images per split, spread evenly over the classes.
    """
    out, source = Path(out), Path(source)
    classes = [f"{i}_{name}" for i, name in enumerate(FASHION_MNIST_CLASSES)]
    params = {"dataset": "fashion-mnist", "limit": limit}
    if limit is not None and limit < len(classes):
        raise UserError(f"limit={limit} leaves some classes without images; use limit >= 10")
    done = _existing(out, params)
    if done is not None:
        return done

    files = {
        split: (f"{stem}-images-idx3-ubyte.gz", f"{stem}-labels-idx1-ubyte.gz")
        for split, stem in (("train", "train"), ("val", "t10k"))
    }
    missing = [name for pair in files.values() for name in pair if not (source / name).is_file()]
    if missing:
        raise UserError(
            f"Fashion-MNIST files {', '.join(missing)} are missing under {source}; install them "
            "with `apt-get install dataset-fashion-mnist`, or use `prepare digits` instead"
        )
    splits = {}
    for split, (images_file, labels_file) in files.items():
        images = _read_idx(source / images_file, ndim=3)
        labels = _read_idx(source / labels_file, ndim=1)
        if len(images) != len(labels):
            raise UserError(
                f"{source / images_file} holds {len(images)} images but {labels_file} holds "
                f"{len(labels)} labels; reinstall with `apt-get install --reinstall "
                "dataset-fashion-mnist`"
            )
        ids = np.arange(len(labels))
        if limit is not None:
            ids = _balanced_subset(labels, limit)
        splits[split] = (images[ids], labels[ids], ids)
    return _write_dataset(out, classes, splits, params)


def prepare_digits(out: Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """scikit-learn's bundled 8x8 digits (1797 images) -> 32x32 JPEGs, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1, e.g. 0.2")
    classes = [f"{i}_{name}" for i, name in enumerate(DIGITS_CLASSES)]
    params = {"dataset": "digits", "val_fraction": val_fraction, "seed": seed}
    done = _existing(out, params)
    if done is not None:
        return done

    digits = load_digits()
    # Pixel values are 0..16; upsample so the smallest CIFAR-style networks (stride 4) still fit.
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    bigger = [Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR) for im in small]
    images = np.stack([np.asarray(im) for im in bigger])
    labels = digits.target.astype(np.int64)
    ids = np.arange(len(labels))
    train_ids, val_ids = train_test_split(
        ids, test_size=val_fraction, random_state=seed, stratify=labels
    )
    splits = {
        split: (images[part], labels[part], part)
        for split, part in (("train", np.sort(train_ids)), ("val", np.sort(val_ids)))
    }
    return _write_dataset(out, classes, splits, params)


def _existing(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a finished prepare at `out`, None when `out` is free to write."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; remove it or choose another --out")
    marker = out / COMPLETE_MARKER
    if marker.is_file():
        summary = json.loads(marker.read_text())
        if summary.get("params") != params:
            raise UserError(
                f"{out} already holds a data set prepared with {summary.get('params')}, not "
                f"{params}; remove it or choose another --out"
            )
        log.info("%s is already prepared (%s); skipping", out, summary["counts"])
        return {**summary, "out": str(out), "skipped": True}
    if any(out.iterdir()):
        raise UserError(
            f"{out} exists but is not a complete prepared data set (no {COMPLETE_MARKER} marker); "
            "remove it or choose another --out"
        )
    return None


def _write_dataset(
    out: Path,
    classes: list[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    params: dict[str, Any],
) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        jobs = []
        for split, (images, labels, ids) in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            # One class per task: parallel file creation in one folder contends on its lock.
            for label, c in enumerate(classes):
                mine = np.flatnonzero(labels == label)
                paths = [f"{split}/{c}/{i:05d}.JPEG" for i in ids[mine]]
                for s in range(0, len(mine), _CHUNK):
                    jobs.append((tmp, paths[s : s + _CHUNK], images[mine[s : s + _CHUNK]]))
        total = sum(len(j[1]) for j in jobs)
        procs = min(usable_cpus(), len(jobs))
        if total >= _POOL_MIN_IMAGES and procs > 1:
            # spawn, not fork: the caller may hold threads (torch) that fork would copy mid-lock.
            # Workers ignore Ctrl-C: the parent stops them and says so in one line.
            with multiprocessing.get_context("spawn").Pool(procs, _ignore_sigint) as pool:
                pool.starmap(_write_jpegs, jobs)
        else:
            for job in jobs:
                _write_jpegs(*job)
        summary = {
            "params": params,
            "classes": classes,
            "counts": {split: len(labels) for split, (_, labels, _) in splits.items()},
        }
        # The marker goes in last and the rename is atomic: `out` is either absent or complete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # _existing() allowed only an empty folder here
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s at %s: %s", params["dataset"], out, summary["counts"])
    return {**summary, "out": str(out), "skipped": False}


def usable_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_jpegs(root: Path, paths: list[str], images: np.ndarray) -> None:
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(root / path, quality=JPEG_QUALITY)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file (the MNIST format): magic 0x0000 0x08 (uint8) <ndim>, sizes, then data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        (magic,) = struct.unpack(">I", raw[:4])
        if magic != 0x0800 + ndim:
            raise ValueError(f"magic number {magic:#x}, expected {0x0800 + ndim:#x}")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(
            f"{path} is not a readable idx file ({e}); reinstall it with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from e


def _balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` indices when classes take turns, so every class gets images; sorted."""
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    # rank[i] = how many earlier images share i's label
    starts = np.searchsorted(labels[order], labels[order])
    rank[order] = np.arange(len(labels)) - starts
    take = np.lexsort((np.arange(len(labels)), rank))[:limit]
    return np.sort(take)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
