"""The ImageNet folder layout: root/<split>/<class>/<image>, indexed once with clear errors.

Classes are the sorted class folder names (label = position), files are sorted within a class, so
every process and every back end sees the same order. Files without an image extension and hidden
entries (".complete", ".ipynb_checkpoints", macOS's "._x.JPEG" companions) are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared lower-case: .JPEG (ImageNet) matches


@dataclass
class FolderIndex:
    root: Path  # the data root that holds the split folders
    split: str
    classes: list[str]
    samples: list[tuple[str, int]]  # (path relative to split_dir: "<class>/<file>", label)

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    def path(self, i: int) -> Path:
        return self.split_dir / self.samples[i][0]

    def __len__(self) -> int:
        return len(self.samples)


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


def index_split(root: str | Path, split: str) -> FolderIndex:
    """Index root/split: sorted classes, sorted image files per class."""
    root = Path(root)
    classes = list_classes(root, split)
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            e.name
            for e in _scan(root / split / name)
            if is_image(e.name) and not e.name.startswith(".") and e.is_file()
        )
        if not files:
            empty.append(name)
        samples += [(f"{name}/{f}", label) for f in files]
    if empty:
        shown = ", ".join(str(root / split / n) for n in empty[:3])
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise UserError(
            f"class folder {shown}{more} holds no images ({'/'.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folder"
        )
    return FolderIndex(root=root, split=split, classes=classes, samples=samples)


def check_same_classes(train: FolderIndex, val: FolderIndex) -> None:
    """Labels are positions in the sorted class list, so both splits must list the same classes."""
    compare_classes(train.classes, val.classes, train.split_dir, val.split_dir)


def compare_classes(a: list[str], b: list[str], a_dir: str | Path, b_dir: str | Path) -> None:
    """Refuse two splits with different class folders (folders or URLs)."""
    if a == b:
        return
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    a_name, b_name = (str(d).rstrip("/").rsplit("/", 1)[-1] for d in (a_dir, b_dir))
    raise UserError(
        f"{a_dir} and {b_dir} have different class folders (only in {a_name}: "
        f"{_few(only_a)}; only in {b_name}: {_few(only_b)}); both splits need the same "
        "class folders, or labels would not match"
    )


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _scan(path: Path) -> list[os.DirEntry]:
    # os.scandir reads the file type with the names: no stat() per file for 1.28M ImageNet files.
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise UserError(f"cannot read folder {path} ({e.strerror}); make it readable") from e
