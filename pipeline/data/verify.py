"""Bad data: find the images that do not decode before a run meets them, and count the ones it
meets anyway.

    python -m pipeline data verify /data/imagenet        # every split, all cores

writes, per split, `<split>.txt` (the images that decode, one `<class>/<file> <label>` line each:
DALI's file_list format) and `<split>.bad.txt` (`<class>/<file>\\t<error>` lines) into the data
root or `--out`. Both loaders then leave out the images listed as bad (`apply_file_lists`). An
image that fails during a run anyway (no list, or a file that broke later) is skipped, logged by
name and counted by `BadImageCounter`; too many end the run with a UserError.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import fsspec
from PIL import Image, UnidentifiedImageError

from pipeline.data.folder import FolderIndex, index_split
from pipeline.errors import UserError

log = logging.getLogger(__name__)

# Judge the bad-file fraction only after this many images (or one epoch, if smaller), so that one
# bad image in the first batch does not end a run. (The torch loader's rule too.)
MIN_SEEN_FOR_BAD_CHECK = 100
_CHUNK = 256  # images per pool task: large enough to amortise the IPC, small for the progress


def decode_error(path: str | Path) -> str | None:
    """None when `path` decodes completely as an image, else the error as one line."""
    try:
        # load() forces the full decode: a truncated file fails here, not just in its header
        # (PIL's LOAD_TRUNCATED_IMAGES stays off). PIL raises many exception types.
        with fsspec.open(str(path), "rb") as f, Image.open(f) as im:  # a path or a URL
            im.load()
    except UnidentifiedImageError:  # its message names the file object, not the file
        return "UnidentifiedImageError: not an image format PIL can read"
    except Exception as e:
        return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
    return None


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [decode_error(p) for p in paths]


@dataclass
class VerifyResult:
    split: str
    images: int
    bad: dict[str, str]  # relative path -> error
    list_path: Path
    bad_path: Path
    seconds: float


def list_paths(lists_dir: Path, split: str) -> tuple[Path, Path]:
    return lists_dir / f"{split}.txt", lists_dir / f"{split}.bad.txt"


def verify_split(root: str | Path, split: str, out: str | Path | None = None,
                 workers: int | None = None, endpoint_url: str = "") -> VerifyResult:
    """Decode every image of root/split on `workers` processes; write the good and bad lists.

    `root` may be an s3:// URL (the lists then go to the local folder `out`)."""
    from pipeline.data.remote import index_url, is_url

    if is_url(str(root)):
        if out is None:
            raise UserError(f"verifying {root} needs --out DIR, a local folder for the lists; "
                            "then set data.file_lists=DIR")
        if endpoint_url:  # read by s3fs here and in the forked workers
            os.environ["AWS_ENDPOINT_URL"] = endpoint_url
        index = index_url(str(root), split, endpoint_url)
    else:
        index = index_split(root, split)
    lists_dir = Path(out) if out else index.root
    try:
        lists_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {lists_dir} ({e.strerror}); pass a writable --out") from e
    paths = [str(index.path(i)) for i in range(len(index))]
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = workers or os.cpu_count() or 1
    started = last_log = time.perf_counter()
    errors: list[str | None] = []
    # fork: the workers need nothing but PIL, and start in milliseconds.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for result in pool.imap(_check_chunk, chunks):
            errors += result
            now = time.perf_counter()
            if now - last_log > 10 or len(errors) == len(paths):
                rate = len(errors) / (now - started)
                eta = (len(paths) - len(errors)) / max(rate, 1e-9)
                log.info("verify %s: %d/%d images, %.0f images/s, ETA %.0f s", split,
                         len(errors), len(paths), rate, eta)
                last_log = now
    bad = {rel: err for (rel, _), err in zip(index.samples, errors) if err is not None}
    list_path, bad_path = list_paths(lists_dir, split)
    _write_atomic(list_path, "".join(f"{rel} {label}\n" for (rel, label), err
                                     in zip(index.samples, errors) if err is None))
    _write_atomic(bad_path, "".join(f"{rel}\t{err}\n" for rel, err in bad.items()))
    return VerifyResult(split, len(paths), bad, list_path, bad_path,
                        time.perf_counter() - started)


def _write_atomic(path: Path, text: str) -> None:
    # A list is read by every later run: never leave a half-written one behind.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror}); pass a writable --out") from e


def apply_file_lists(index: FolderIndex, lists_dir: str | Path = "") -> FolderIndex:
    """`index` without the images that `data verify` listed as bad (unchanged without lists).

    Images added after the verify are kept (a run still skips them if they fail) and counted in
    a warning, so the user knows the lists are stale.
    """
    lists_dir = Path(lists_dir) if lists_dir else index.root
    list_path, bad_path = list_paths(lists_dir, index.split)
    if not list_path.is_file():
        return index
    good = {line.rsplit(" ", 1)[0] for line in _lines(list_path)}
    bad = {line.split("\t", 1)[0] for line in _lines(bad_path)} if bad_path.is_file() else set()
    samples = [s for s in index.samples if s[0] not in bad]
    unverified = sum(1 for rel, _ in samples if rel not in good)
    if bad:
        shown = ", ".join(sorted(bad)[:3]) + (" ..." if len(bad) > 3 else "")
        log.info("%s: leaving out %d images that do not decode (%s), as listed in %s",
                 index.split_dir, len(index) - len(samples), shown, bad_path)
    if unverified:
        log.warning("%s: %d images are not in %s (added after `data verify`?); run `python -m "
                    "pipeline data verify %s` again", index.split_dir, unverified, list_path,
                    index.root)
    if not samples:
        raise UserError(f"every image of {index.split_dir} is listed as bad in {bad_path}; "
                        "replace the images or delete the lists")
    return replace(index, samples=samples)


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

    def record(self, attempted: int, bad: list[tuple[str, str]] = ()) -> None:
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
