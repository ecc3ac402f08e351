"""Listing the ImageNet folder layout, root/<split>/<class>/<image>, on local disk or in object
storage (`s3://bucket/imagenet`), into a SampleIndex, with clear errors.

Classes are the sorted class folder names (label = position), files are sorted within a class, so
every process, every back end and a local copy of a bucket see the same order. Files without an
image extension and hidden entries (".complete", ".ipynb_checkpoints", macOS's "._x.JPEG"
companions) are ignored. Object storage is listed through fsspec/s3fs (credentials from the
standard AWS chain, an S3-compatible server from `endpoint_url`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.index import SampleIndex, class_difference
from pipeline.errors import UserError
from pipeline.storage.urls import is_remote, open_url

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared lower-case: .JPEG (ImageNet) matches


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_classes(root: str | Path, split: str) -> list[str]:
    """The sorted class folder names of root/split, with a clear error when the layout is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist; create it with "
            f"`python -m pipeline prepare fashion-mnist --out {root}` or set data.root"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(e.name for e in _scan(root) if e.is_dir() and not e.name.startswith("."))
        raise UserError(
            f"split folder {split_dir} does not exist (found: {', '.join(found) or 'nothing'}); "
            f"data.root must hold train/ and val/ folders, each with one folder per class"
        )
    entries = [e for e in _scan(split_dir) if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if is_image(e.name))
        detail = f" ({loose} images lie directly in it)" if loose else ""
        raise UserError(
            f"{split_dir} has no class folders{detail}; put each class's images in its own "
            f"folder: {split_dir}/<class>/<image>.JPEG"
        )
    return classes


def index_split(root: str | Path, split: str, endpoint_url: str = "") -> SampleIndex:
    """Index root/split, a local folder or a URL: sorted classes, sorted image files per class."""
    if is_remote(root):
        return index_url(str(root), split, endpoint_url)
    root = Path(root)
    classes = list_classes(root, split)
    empty = []

    def class_files():  # one class at a time (see SampleIndex.from_class_files)
        for name in classes:
            names = sorted(
                e.name
                for e in _scan(root / split / name)
                if is_image(e.name) and not e.name.startswith(".") and e.is_file()
            )
            if not names:
                empty.append(name)
            yield names

    index = SampleIndex.from_class_files(root, split, classes, class_files())
    if empty:
        shown = ", ".join(str(root / split / n) for n in empty[:3])
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise UserError(
            f"class folder {shown}{more} holds no images ({'/'.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folder"
        )
    return index


def list_split_classes(root: str | Path, split: str, endpoint_url: str = "") -> list[str]:
    """The sorted class folder names of root/split, a local folder or a URL."""
    if is_remote(root):
        return list_url_classes(str(root), split, endpoint_url)
    return list_classes(root, split)


def check_same_classes(train: SampleIndex, val: SampleIndex) -> None:
    """Labels are positions in the sorted class list, so both splits must list the same classes."""
    compare_classes(train.classes, val.classes, train.split_dir, val.split_dir)


def compare_classes(a: list[str], b: list[str], a_dir: str | Path, b_dir: str | Path) -> None:
    """Refuse two splits with different class folders (folders or URLs)."""
    a_name, b_name = (str(d).rstrip("/").rsplit("/", 1)[-1] for d in (a_dir, b_dir))
    change = class_difference(a, b, a_name, b_name)
    if change:
        raise UserError(f"{a_dir} and {b_dir} have different class folders ({change}); both "
                        "splits need the same class folders, or labels would not match")


def _scan(path: Path) -> list[os.DirEntry]:
    # os.scandir reads the file type with the names: no stat() per file for 1.28M ImageNet files.
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise UserError(f"cannot read folder {path} ({e.strerror}); make it readable") from e


# --- object storage ------------------------------------------------------------------------------


def _listing(root: str, split: str, endpoint_url: str, list_files: bool) -> tuple[list, str]:
    """(keys under root/split, recursively; or its entries, one level), and fsspec's base path;
    one-line errors for a missing package, a server that is down, or missing credentials."""
    fs, base = open_url(f"{root}/{split}", endpoint_url, "data.root")
    try:
        return (fs.find(base) if list_files else fs.ls(base, detail=True)), base
    except FileNotFoundError:
        return [], base
    except Exception as e:  # OSError, ValueError, and botocore errors s3fs does not translate
        raise UserError(f"cannot list {root}/{split} ({type(e).__name__}: {e}); check the URL, "
                        "data.endpoint_url and the AWS_* credentials") from e


def list_url_classes(root: str, split: str, endpoint_url: str = "") -> list[str]:
    """The sorted class folder names of root/split in object storage (one level, not every key)."""
    entries, _ = _listing(root.rstrip("/"), split, endpoint_url, list_files=False)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                  if e["type"] == "directory" and not e["name"].rsplit("/", 1)[-1].startswith("."))


def index_url(root: str, split: str, endpoint_url: str = "") -> SampleIndex:
    """List root/split/<class>/<image> in object storage (one recursive listing)."""
    root = root.rstrip("/")
    keys, base = _listing(root, split, endpoint_url, list_files=True)
    per_class: dict[str, list[str]] = {}
    for key in keys:
        parts = key[len(base) + 1 :].split("/")
        if len(parts) == 2 and is_image(parts[1]) and not any(p.startswith(".") for p in parts):
            per_class.setdefault(parts[0], []).append(parts[1])
    if not per_class:
        raise UserError(f"{root}/{split} holds no <class>/<image> files; data.root must hold "
                        "train/ and val/ folders, each with one folder per class")
    classes = sorted(per_class)
    return SampleIndex.from_class_files(root, split, classes,
                                        [sorted(per_class[c]) for c in classes])
