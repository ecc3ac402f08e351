"""`python -m pipeline data verify`: find the images that do not decode before a run meets them.

    python -m pipeline data verify /data/imagenet        # every split, all cores

writes, per split, `<split>.txt` (the images that decode, one `<class>/<file> <label>` line each:
DALI's file_list format) and `<split>.bad.txt` (`<class>/<file>\\t<error>` lines) into the data
root or `--out`. The loaders then leave out the images listed as bad (pipeline/data/badimages.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.badimages import decode_error, list_paths
from pipeline.data.listing import index_split, is_remote
from pipeline.errors import UserError

log = logging.getLogger(__name__)

_CHUNK = 256  # images per pool task: large enough to amortise the IPC, small for the progress


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


def verify_split(root: str | Path, split: str, out: str | Path | None = None,
                 workers: int | None = None, endpoint_url: str = "") -> VerifyResult:
    """Decode every image of root/split on `workers` processes; write the good and bad lists.

    `root` may be an s3:// URL (the lists then go to the local folder `out`)."""
    if is_remote(root):
        if out is None:
            raise UserError(f"verifying {root} needs --out DIR, a local folder for the lists; "
                            "then set data.file_lists=DIR")
        if endpoint_url:  # read by s3fs here and in the forked workers
            os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    index = index_split(root, split, endpoint_url)
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
    bad = {rel: err for (rel, _), err in zip(index.samples(), errors) if err is not None}
    list_path, bad_path = list_paths(lists_dir, split)
    _write_atomic(list_path, "".join(f"{rel} {label}\n" for (rel, label), err
                                     in zip(index.samples(), errors) if err is None))
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
