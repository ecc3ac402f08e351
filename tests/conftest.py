"""Shared fixtures: tiny ImageNet-layout folders of real JPEG files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    counts: dict[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """root/{split}/<class>/<class>_<i>.JPEG random-noise JPEGs; 12 train and 4 val per class."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or {"train": 12, "val": 4}).items():
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x (12 train, 4 val) 32x32 JPEGs under tmp_path/data."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """A factory for folders with other classes, counts or sizes: make_image_folder(name, ...)."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make
