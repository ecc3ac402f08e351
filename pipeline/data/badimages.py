"""The bad-image policy, shared by every back end: leave out what `data verify` listed as bad, and
skip, name and count what a run meets anyway.

`python -m pipeline data verify` (pipeline/data/verify.py) writes, per split, `<split>.txt` (the
images that decode, one `<class>/<file> <label>` line each: DALI's file_list format) and
`<split>.bad.txt` (`<class>/<file>\\t<error>` lines). The loaders leave out the images listed as bad
(`apply_file_lists`). An image that fails during a run anyway (no list, or a file that broke later)
is skipped, logged by name and counted by `BadImageCounter`; too many end the run with a UserError.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.index import SampleIndex
from pipeline.errors import UserError
from pipeline.storage.urls import open_url

log = logging.getLogger(__name__)

# Judge the bad-file fraction only after this many images (or one epoch, if smaller), so that one
# bad image in the first batch does not end a run.
MIN_SEEN_FOR_BAD_CHECK = 100


def decode_error(image: str | Path | bytes) -> str | None:
    """None when `image` (a local path, or the file's bytes) decodes completely as an image,
    else the error as one line. An image in object storage is read by its caller, with the
    data's endpoint (url_decode_error)."""
    try:
        # load() forces the full decode: a truncated file fails here, not just in its header
        # (PIL's LOAD_TRUNCATED_IMAGES stays off). PIL raises many exception types.
        with (io.BytesIO(image) if isinstance(image, bytes) else open(image, "rb")
              ) as f, Image.open(f) as im:
            im.load()
    except UnidentifiedImageError:  # its message names the file object, not the file
        return "UnidentifiedImageError: not an image format PIL can read"
    except Exception as e:
        return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
    return None


def url_decode_error(url: str, endpoint_url: str) -> str | None:
    """decode_error of the object at `url`, read through a client with the data's endpoint (the
    environment names none), and a failed read in the same one-line form."""
    fs = open_url(url, endpoint_url, "data.root")[0]  # fsspec's cached client for these options
    try:
        data = fs.cat_file(url)
    except Exception as e:  # FileNotFoundError, PermissionError, botocore's own
        return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
    return decode_error(data)


def list_paths(lists_dir: Path, split: str) -> tuple[Path, Path]:
    """Where `data verify` writes a split's lists: (good images, bad images)."""
    return lists_dir / f"{split}.txt", lists_dir / f"{split}.bad.txt"


def apply_file_lists(index: SampleIndex, lists_dir: str | Path = "") -> SampleIndex:
    """`index` without the images that `data verify` listed as bad (unchanged without lists; the
    lists of a remote root are in a local `lists_dir`).

    Images added after the verify are kept (a run still skips them if they fail) and counted in
    a warning, so the user knows the lists are stale.
    """
    if not lists_dir and index.is_remote:
        return index
    lists_dir = Path(lists_dir) if lists_dir else index.root
    list_path, bad_path = list_paths(lists_dir, index.split)
    if not list_path.is_file():
        return index
    good = {line.rsplit(" ", 1)[0] for line in _lines(list_path)}
    bad = {line.split("\t", 1)[0] for line in _lines(bad_path)} if bad_path.is_file() else set()
    relpaths = [rel for rel, _ in index.samples()]
    keep = np.fromiter((rel not in bad for rel in relpaths), dtype=bool, count=len(relpaths))
    unverified = sum(1 for rel, k in zip(relpaths, keep) if k and rel not in good)
    kept = int(keep.sum())
    if bad:
        shown = ", ".join(sorted(bad)[:3]) + (" ..." if len(bad) > 3 else "")
        log.info("%s: leaving out %d images that do not decode (%s), as listed in %s",
                 index.split_dir, len(index) - kept, shown, bad_path)
    if unverified:
        log.warning("%s: %d images are not in %s (added after `data verify`?); run `python -m "
                    "pipeline data verify %s` again", index.split_dir, unverified, list_path,
                    index.root)
    if not kept:
        raise UserError(f"every image of {index.split_dir} is listed as bad in {bad_path}; "
                        "replace the images or delete the lists")
    return index if kept == len(index) else index.subset(keep)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


class BadImageCounter:
    """Counts the images a loader attempted and the bad ones among them; logs each bad image once
    by name and raises a UserError once more than `max_fraction` of those seen were bad."""

    def __init__(self, max_fraction: float, images_per_epoch: int):
        self.max_fraction = max_fraction
        self.seen = 0  # images attempted, good or bad, since the loader was built
        self.bad_files: list[str] = []
        self._bad_set: set[str] = set()
        self._min_seen = min(MIN_SEEN_FOR_BAD_CHECK, images_per_epoch)

    def record(self, attempted: int, bad: Iterable[tuple[str, str]] = ()) -> None:
        """`attempted` images were tried, `bad` ((path, error) pairs) of them failed."""
        self.seen += attempted
        for path, error in bad:
            if path not in self._bad_set:
                self._bad_set.add(path)
                self.bad_files.append(path)
                log.warning("skipping image that does not decode: %s (%s)", path, error)
        n = len(self.bad_files)
        if n and self.seen >= self._min_seen and n > self.max_fraction * max(self.seen, 1):
            shown = ", ".join(self.bad_files[:3]) + (" ..." if n > 3 else "")
            raise UserError(
                f"{n} of {self.seen} images ({n / self.seen:.1%}) failed to decode, more than "
                f"data.max_bad_fraction={self.max_fraction}: {shown}; run `python -m pipeline "
                "data verify DATA_ROOT` to list and leave them out, or raise "
                "data.max_bad_fraction"
            )
