"""The samples of one split, held compactly: ImageNet's 1.28M files in ~33 MB of numpy arrays.

A Python list of (path, label) tuples costs ~150 bytes per sample (two objects and a tuple), and
every DataLoader worker that reads it writes to those objects' reference counts, so fork's
copy-on-write gives each worker its own copy of every page it touched. Here the file names are one
joined bytes buffer with offsets, the labels one small-integer array: reading them touches no
Python object of the index, so forked workers share its pages (benchmarks/bench_index.py).

File names are stored without their class folder (the label names it): ImageNet's class folders
would add 10 bytes to each of the 1.28M entries.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class SampleIndex:
    """root/<split>/<class>/<file> for every sample: label i = position of the class in the
    sorted class list. `root` is a local Path or a URL string (s3://bucket/imagenet)."""

    def __init__(self, root: Path | str, split: str, classes: list[str], names: np.ndarray,
                 offsets: np.ndarray, labels: np.ndarray):
        self.root = root
        self.split = split
        self.classes = classes
        self._names = names  # uint8: the UTF-8 file names, joined
        self._offsets = offsets  # name i is _names[offsets[i]:offsets[i + 1]]
        self.labels = labels  # int16 (int32 beyond 32,767 classes), one per sample

    @classmethod
    def from_class_files(cls, root: Path | str, split: str, classes: list[str],
                         files: Iterable[Sequence[str]]) -> SampleIndex:
        """The index of the file names inside each class folder, in order: `files` yields one
        sequence per class, so that a generator (the listing) never holds more than one class's
        Python strings."""
        chunks, lengths = [], []
        for names in files:
            encoded = [name.encode() for name in names]
            chunks.append(np.frombuffer(b"".join(encoded), dtype=np.uint8))
            lengths.append(np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded)))
        counts = [len(n) for n in lengths]
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
        total = int(all_lengths.sum(dtype=np.int64))
        # int32 offsets where they fit: 5 MB instead of 10 at ImageNet's size
        offsets = np.zeros(len(all_lengths) + 1, dtype=np.int32 if total < 2**31 else np.int64)
        np.cumsum(all_lengths, out=offsets[1:])
        names = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
        label_type = np.int16 if len(classes) <= np.iinfo(np.int16).max else np.int32
        labels = np.repeat(np.arange(len(classes), dtype=label_type), counts)
        del chunks, lengths, all_lengths
        _release_freed_heap()
        return cls(root, split, classes, names, offsets, labels)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, str)

    @property
    def split_dir(self) -> Path | str:
        return f"{self.root}/{self.split}" if self.is_remote else self.root / self.split

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def relpath(self, i: int) -> str:
        """"<class>/<file>", relative to split_dir."""
        name = self._names[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()
        return f"{self.classes[self.labels[i]]}/{name}"

    def path(self, i: int) -> Path | str:
        """The file of sample i: a Path, or a URL string for a remote root."""
        if self.is_remote:
            return f"{self.split_dir}/{self.relpath(i)}"
        return self.split_dir / self.relpath(i)

    def sample(self, i: int) -> tuple[str, int]:
        return self.relpath(i), self.label(i)

    def samples(self) -> Iterator[tuple[str, int]]:
        """(relative path, label) of every sample, in order (made one at a time)."""
        return (self.sample(i) for i in range(len(self)))

    def identity(self) -> DataIdentity:
        """What a checkpoint records of the data it was trained on (`DataIdentity`), from the
        arrays the listing filled anyway: no file is read, ~60 ms for ImageNet's 1.28M names."""
        counts = np.bincount(self.labels, minlength=len(self.classes)).astype("<i8")
        digest = hashlib.sha256(counts.tobytes())  # which names belong to which class
        digest.update(np.diff(self._offsets).astype("<i8").tobytes())  # where each name ends
        digest.update(self._names)  # the names, sorted within each class by the listing
        return DataIdentity(tuple(self.classes), tuple(int(n) for n in counts),
                            digest.hexdigest())

    def subset(self, keep: np.ndarray) -> SampleIndex:
        """The samples where the boolean mask `keep` is true, in the same order."""
        kept = np.flatnonzero(keep)
        files: list[list[str]] = [[] for _ in self.classes]
        for i in kept:
            files[self.labels[i]].append(self.relpath(i).split("/", 1)[1])
        return SampleIndex.from_class_files(self.root, self.split, self.classes, files)


@dataclass(frozen=True)
class DataIdentity:
    """Which data set a run trained on, small enough for a checkpoint's meta (ImageNet: ~25 kB):
    the sorted class folders, the training images of each, and a sha256 of their file names.

    A resume may find data.root moved (a local copy of a bucket), which is fine, or changed
    under it, which is not: labels are positions in the class list, so a renamed or removed
    class folder shifts or breaks every label, and other images change what an epoch is
    (pipeline/train/trainer.py refuses both, the second unless data.allow_sample_change).
    Evaluation compares the classes only. The digest covers the file names, not the bytes:
    reading 140 GB to resume is not cheap, and a file replaced under the same name is rare."""

    classes: tuple[str, ...]
    images_per_class: tuple[int, ...]
    files_sha256: str

    def to_meta(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "images_per_class": list(self.images_per_class),
                "files_sha256": self.files_sha256}

    @classmethod
    def from_meta(cls, value: Any) -> DataIdentity:
        """The record `to_meta` wrote; a ValueError naming the field for anything else (a
        manifest's meta comes from a bucket: untrusted)."""
        if not isinstance(value, dict):
            raise ValueError(f"is a {type(value).__name__}, not an object")
        missing = [k for k in ("classes", "images_per_class", "files_sha256") if k not in value]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        classes, counts, digest = value["classes"], value["images_per_class"], \
            value["files_sha256"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes is not a list of names")
        if not isinstance(counts, list) or len(counts) != len(classes) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise ValueError(f"images_per_class is not {len(classes)} integers >= 0, one per "
                             "class")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("files_sha256 is not 64 lowercase hex digits")
        return cls(tuple(classes), tuple(counts), digest)

    def class_change(self, saved: DataIdentity) -> str | None:
        """How this data's classes differ from the checkpoint's (`saved`), or None."""
        return class_difference(saved.classes, self.classes, "the checkpoint", "data.root")

    def sample_change(self, saved: DataIdentity) -> str | None:
        """How this data's training images differ from the checkpoint's of the same classes
        (`saved`), or None: the first class whose count differs, else the file names."""
        if self.images_per_class != saved.images_per_class:
            differ = [i for i, (a, b) in enumerate(zip(self.images_per_class,
                                                       saved.images_per_class)) if a != b]
            i = differ[0]
            more = f"; {len(differ) - 1} more classes differ" if len(differ) > 1 else ""
            return (f"class {self.classes[i]!r} has {self.images_per_class[i]} training "
                    f"images, the checkpoint's data had {saved.images_per_class[i]} "
                    f"({sum(self.images_per_class)} in all, the checkpoint's "
                    f"{sum(saved.images_per_class)}{more})")
        if self.files_sha256 != saved.files_sha256:
            return "the same classes and counts, other file names"
        return None


def class_difference(a: Sequence[str], b: Sequence[str], a_name: str, b_name: str) -> str | None:
    """How class list `b` differs from `a` ("only in A: 'x'; only in B: 'y'"), or None."""
    if list(a) == list(b):
        return None
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if not only_a and not only_b:
        return f"the same classes in another order in {b_name}"
    return (f"only in {a_name}: {few([repr(c) for c in only_a])}; "
            f"only in {b_name}: {few([repr(c) for c in only_b])}")


def few(names: list[str], n: int = 5) -> str:
    """The first `n` names and how many more, for a one-line message."""
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _release_freed_heap() -> None:
    """Give the heap that the listing's temporary objects (1.28M names and directory entries for
    ImageNet) no longer use back to the system. glibc keeps freed heap pages otherwise: measured
    ~47 MB of RSS for the index's 29 MB of arrays, 31 MB after this (benchmarks/bench_index.py)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
