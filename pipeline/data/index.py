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
from collections.abc import Iterable, Iterator, Sequence
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

    def subset(self, keep: np.ndarray) -> SampleIndex:
        """The samples where the boolean mask `keep` is true, in the same order."""
        kept = np.flatnonzero(keep)
        files: list[list[str]] = [[] for _ in self.classes]
        for i in kept:
            files[self.labels[i]].append(self.relpath(i).split("/", 1)[1])
        return SampleIndex.from_class_files(self.root, self.split, self.classes, files)


def _release_freed_heap() -> None:
    """Give the heap that the listing's temporary objects (1.28M names and directory entries for
    ImageNet) no longer use back to the system. glibc keeps freed heap pages otherwise: measured
    ~47 MB of RSS for the index's 29 MB of arrays, 31 MB after this (benchmarks/bench_index.py)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
