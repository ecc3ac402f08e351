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

from collections.abc import Iterator, Sequence
from pathlib import Path

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
                         files: Sequence[Sequence[str]]) -> SampleIndex:
        """The index of `files[label]` (file names inside each class folder, in order)."""
        encoded = [name.encode() for names in files for name in names]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] < 2**31:  # halves the offsets: 5 MB instead of 10 at ImageNet's size
            offsets = offsets.astype(np.int32)
        names = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        label_type = np.int16 if len(classes) <= np.iinfo(np.int16).max else np.int32
        labels = np.repeat(np.arange(len(classes), dtype=label_type),
                           [len(names_) for names_ in files])
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

    def subset(self, keep: np.ndarray) -> SampleIndex:
        """The samples where the boolean mask `keep` is true, in the same order."""
        kept = np.flatnonzero(keep)
        files: list[list[str]] = [[] for _ in self.classes]
        for i in kept:
            files[self.labels[i]].append(self.relpath(i).split("/", 1)[1])
        return SampleIndex.from_class_files(self.root, self.split, self.classes, files)
