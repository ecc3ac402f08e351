"""`python -m pipeline data verify`: find the images that do not decode before a run meets them.

    python -m pipeline data verify /data/imagenet        # every split, all cores
    python -m pipeline data verify s3://bucket/imagenet-shards/shards.json

For an image folder it writes, per split, `<split>.txt` (the images that decode, one
`<class>/<file> <label>` line each: DALI's file_list format) and `<split>.bad.txt`
(`<class>/<file>\\t<error>` lines) into the data root or `--out`. The loaders then leave out the
images listed as bad (pipeline/data/badimages.py).
For tar shards it reads every shard whole and names each problem in one line: a shard missing,
truncated or changed (sha256), a member that is not where the sample table says, a sample
without its `.cls` or with another label, a JPEG that does not decode.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.data.badimages import decode_error, list_paths, url_decode_error
from pipeline.data.listing import index_split
from pipeline.data.shards import ShardIndex, load_shard_index
from pipeline.errors import UserError
from pipeline.storage.urls import is_remote, open_url

log = logging.getLogger(__name__)

_CHUNK = 256  # images per pool task: large enough to amortise the IPC, small for the progress


def _check_chunk(paths: list[str], endpoint_url: str = "") -> list[str | None]:
    return [url_decode_error(p, endpoint_url) if is_remote(p) else decode_error(p)
            for p in paths]


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
    if is_remote(root) and out is None:
        raise UserError(f"verifying {root} needs --out DIR, a local folder for the lists; "
                        "then set data.file_lists=DIR")
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
        for result in pool.imap(partial(_check_chunk, endpoint_url=endpoint_url), chunks):
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


def verify_shards(url: str, split: str, workers: int | None = None,
                  endpoint_url: str = "") -> tuple[ShardIndex, list[str]]:
    """Read every shard of `split` of the manifest at `url` whole; returns its index and one
    line per problem found (none: every sample is what the manifest says, and decodes)."""
    index = load_shard_index(url, split, endpoint_url, check_files=False)
    jobs = range(len(index.shards))
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    problems: list[str] = []
    started = last_log = time.perf_counter()
    # spawn, not fork: s3fs's event loop thread must not be copied mid-lock. The index goes to
    # each worker once, not with each shard.
    with multiprocessing.get_context("spawn").Pool(workers, _set_index, (index,)) as pool:
        for done, found in enumerate(pool.imap(_check_shard, jobs), 1):
            problems += found
            now = time.perf_counter()
            if now - last_log > 10 or done == len(jobs):
                log.info("verify %s: %d/%d shards, %.0f images/s", index.split_dir, done,
                         len(jobs), index.starts[done] / (now - started))
                last_log = now
    return index, problems


_index: ShardIndex | None = None  # a verify worker's


def _set_index(index: ShardIndex) -> None:
    global _index
    _index = index


def _check_shard(s: int) -> list[str]:
    index = _index
    shard, url = index.shards[s], index.shard_url(s)
    fs = open_url(url, index.endpoint_url, "data.root")[0]
    try:
        data = fs.cat_file(url)
    except FileNotFoundError:
        return [f"{url}: missing"]
    except Exception as e:
        return [f"{url}: cannot be read ({type(e).__name__}: {e})"]
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{url}: {len(data)} bytes, the manifest says {shard.bytes}: it is "
                        "truncated or was replaced")
    elif hashlib.sha256(data).hexdigest() != shard.sha256:
        problems.append(f"{url}: its sha256 is not the manifest's: it changed after conversion")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError) as e:
        return [*problems, f"{url}: not a whole tar file ({type(e).__name__}: {e})"]
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        stem, _, ext = m.name.rpartition(".")
        samples.setdefault(stem, {})[ext] = m
    first, end = int(index.starts[s]), int(index.starts[s + 1])
    if len(samples) != end - first:
        problems.append(f"{url}: {len(samples)} samples, the manifest says {end - first}")
    for i, (stem, files) in zip(range(first, end), samples.items()):
        cls = files.pop("cls", None)
        image = next(iter(files.values()), None)  # .jpg, or the source's own extension
        name = f"{url}#{stem}"
        if image is None or cls is None:
            problems.append(f"{name}: no {'image' if image is None else '.cls'} file")
            continue
        if (image.offset_data, image.size) != (int(index.offsets[i]), int(index.sizes[i])):
            problems.append(f"{url}#{image.name}: not at the bytes the sample table says")
            continue
        jpeg = data[image.offset_data : image.offset_data + image.size]
        label = data[cls.offset_data : cls.offset_data + cls.size].decode("ascii", "replace")
        if zlib.crc32(jpeg) != int(index.crcs[i]):
            problems.append(f"{url}#{image.name}: its bytes differ from those converted (crc32)")
        elif label.strip() != str(int(index.labels[i])):
            problems.append(f"{name}.cls: label {label!r}, the sample table says "
                            f"{int(index.labels[i])}")
        elif error := decode_error(jpeg):
            problems.append(f"{url}#{image.name}: does not decode ({error})")
    return problems
