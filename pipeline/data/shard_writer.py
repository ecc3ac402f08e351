"""`python -m pipeline prepare shards SRC --out URL`: an ImageNet-layout folder (local or in object
storage) becomes tar shards, their DALI index files, a sample table and a manifest written last
(the format: pipeline/data/shards.py).

- Every image is decoded on the way; one that does not decode is left out and listed in the
  manifest (`left_out`), so a run never meets it.
- Deterministic: the same SRC and options give the same files, byte for byte (tar headers carry
  no time or owner; the order is sorted, or a permutation seeded by --seed).
- Resumable: each finished shard leaves a small record (`<split>/done/shard-N.json`: its
  sha256, its part of the sample table, the images it left out); a run that was killed starts
  again, skips the shards whose record is there, and writes only the others. A record that does
  not match the plan (SRC changed, other options) is refused in one line.
- The images of a shard are in sorted class order with `--order sorted`; the default shuffles
  them once (seeded) so that each shard mixes the classes: a loader's shuffle window then needs
  to hold only a few blocks for its batches to mix classes (docs/data.md, "Shuffle").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.badimages import decode_error
from pipeline.data.index import SampleIndex
from pipeline.data.listing import index_split, list_split_classes
from pipeline.data.prepare import usable_cpus
from pipeline.data.shards import FORMAT, MANIFEST, MAX_SHARD_BYTES, TABLE, shard_name, shard_sizes
from pipeline.errors import UserError
from pipeline.report import format_duration
from pipeline.storage.atomic import is_local, write_atomically
from pipeline.storage.urls import is_remote, open_url

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_READ_THREADS = 16  # concurrent GETs per worker for an SRC in object storage


def prepare_shards(src: str, out: str, *, images_per_shard: int = 1000, order: str = "shuffled",
                   seed: int = 0, workers: int = 0, endpoint_url: str = "") -> dict[str, Any]:
    """Convert SRC's train and val splits (val only where SRC has it) into shards under `out`;
    returns the manifest's summary."""
    if images_per_shard < 1:
        raise UserError(f"--images-per-shard={images_per_shard}; use a number >= 1, e.g. 1000")
    if order not in ("shuffled", "sorted"):
        raise UserError(f"--order={order}; use shuffled or sorted")
    src, out = str(src).rstrip("/"), str(out).rstrip("/")
    fs, root = open_url(out, endpoint_url, "--out")
    options = {"images_per_shard": images_per_shard, "order": order, "seed": seed}
    splits: dict[str, Any] = {}
    classes: list[str] = []
    for split in SPLITS:
        if split != "train" and not _has_split(src, split, endpoint_url):
            log.info("%s has no %s/ folder: no %s shards", src, split, split)
            continue
        index = index_split(src, split, endpoint_url)
        if classes and index.classes != classes:
            raise UserError(f"{src}/{split} has other class folders than {src}/train; both "
                            "splits need the same classes")
        classes = index.classes
        splits[split] = _convert_split(index, fs, root, out, options, workers, endpoint_url)
    manifest = {"format": FORMAT, "classes": classes, "options": options, "splits": splits}
    # Last: a manifest exists only once every shard and table it names does.
    _write(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=1).encode() + b"\n")
    summary = {split: {"samples": sum(s["samples"] for s in e["shards"]),
                       "shards": len(e["shards"]), "left_out": len(e["left_out"])}
               for split, e in splits.items()}
    log.info("wrote %s/%s: %s", out, MANIFEST, summary)
    return {"manifest": f"{out}/{MANIFEST}", "splits": summary}


def _has_split(src: str, split: str, endpoint_url: str) -> bool:
    if not is_remote(src):
        return Path(src, split).is_dir()
    try:
        return bool(list_split_classes(src, split, endpoint_url))
    except UserError:
        return False


def _convert_split(index: SampleIndex, fs: Any, root: str, out: str, options: dict[str, Any],
                   workers: int, endpoint_url: str) -> dict[str, Any]:
    split, per_shard = index.split, options["images_per_shard"]
    ids = np.arange(len(index))
    if options["order"] == "shuffled":
        ids = np.random.Generator(np.random.PCG64(options["seed"])).permutation(len(index))
    plans = [[index.sample(int(i)) for i in ids[k : k + per_shard]]
             for k in range(0, len(ids), per_shard)]
    try:  # the first look at --out
        done = _done_records(fs, f"{root}/{split}/done")
        sizes = shard_sizes(fs, f"{root}/{split}")
    except Exception as e:
        raise UserError(f"cannot read {out} ({type(e).__name__}: {e}); check --out, "
                        "--endpoint-url and the credentials") from e
    for k, record in done.items():
        if k >= len(plans) or record["plan"] != _plan_digest(plans[k]):
            raise UserError(f"{out}/{split} holds shards converted from other images or with "
                            f"other options (shard {k} differs); delete {out} or choose another "
                            "--out")
    # a shard deleted (or cut short) since its record was written is written again
    for k in [k for k, r in done.items()
              if r["samples"] and sizes.get(shard_name(split, k).rsplit("/", 1)[1]) != r["bytes"]]:
        del done[k]
    todo = [k for k in range(len(plans)) if k not in done]
    if done:
        log.info("%s: %d of %d shards are done already; writing the other %d", split, len(done),
                 len(plans), len(todo))
    jobs = [(str(index.split_dir), out, endpoint_url, split, k, plans[k]) for k in todo]
    images = sum(len(plans[k]) for k in todo)
    procs = min(workers or usable_cpus(), len(jobs))
    started = last_log = time.perf_counter()
    converted = 0
    # spawn: the caller may hold threads (s3fs's event loop) that fork would copy mid-lock.
    # Workers ignore Ctrl-C: the parent stops them.
    pool = multiprocessing.get_context("spawn").Pool(procs, _ignore_sigint) if procs > 1 else \
        contextlib.nullcontext()
    with pool:
        for record in (pool.imap_unordered(_write_shard, jobs) if procs > 1 else
                       map(_write_shard, jobs)):
            done[record["number"]] = record
            converted += record["samples"] + len(record["left_out"])
            now = time.perf_counter()
            if now - last_log > 10 or converted == images:
                rate = converted / max(now - started, 1e-9)
                log.info("prepare shards %s: %d/%d images, %.0f images/s, ETA %s", split,
                         converted, images, rate,
                         format_duration((images - converted) / max(rate, 1e-9)))
                last_log = now
    records = [done[k] for k in range(len(plans))]
    table = io.BytesIO()
    np.savez(table, **{key: np.concatenate([np.asarray(r[key], dtype=dtype) for r in records])
                       for key, dtype in (("offsets", np.uint32), ("sizes", np.uint32),
                                          ("crcs", np.uint32), ("labels", _label_type(index)))})
    table_name = f"{split}/{TABLE}"
    _write(fs, f"{root}/{table_name}", table.getvalue())
    return {
        "shards": [{"name": shard_name(split, r["number"]), "samples": r["samples"],
                    "bytes": r["bytes"], "sha256": r["sha256"]} for r in records if r["samples"]],
        "table": {"name": table_name, "sha256": hashlib.sha256(table.getvalue()).hexdigest()},
        "identity": index.identity().to_meta(),
        "left_out": [bad for r in records for bad in r["left_out"]],
    }


def _write_shard(job: tuple[str, str, str, str, int, list[tuple[str, int]]]) -> dict[str, Any]:
    """Read, decode, and write one shard, its DALI index and its record (last); returns the
    record."""
    split_dir, out, endpoint_url, split, number, plan = job
    fs, root = _open(out, endpoint_url, "--out")
    remote = is_remote(split_dir)
    src_fs = _open(split_dir, endpoint_url, "SRC")[0] if remote else None

    def read(rel: str) -> bytes | Exception:
        try:
            return src_fs.cat_file(f"{split_dir}/{rel}") if remote else \
                Path(split_dir, rel).read_bytes()
        except Exception as e:  # named in the error below; a missing file is one too
            return e

    with ThreadPoolExecutor(_READ_THREADS if remote else 1) as threads:
        contents = list(threads.map(read, [rel for rel, _ in plan]))
    buffer = io.BytesIO()
    kept, left_out = [], []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for (rel, label), data in zip(plan, contents):
            if isinstance(data, Exception):
                raise UserError(f"cannot read {split_dir}/{rel} ({type(data).__name__}: {data}); "
                                "check SRC and, for S3, --endpoint-url and the credentials")
            error = decode_error(data)
            if error:
                left_out.append({"file": rel, "error": error})
                continue
            stem, ext = rel.rsplit(".", 1)
            ext = "jpg" if ext.lower() in ("jpeg", "jpg") else ext.lower()
            _add(tar, f"{stem}.{ext}", data)
            _add(tar, f"{stem}.cls", str(label).encode())
            kept.append((label, zlib.crc32(data)))
    shard = buffer.getvalue()
    if len(shard) > MAX_SHARD_BYTES:
        raise UserError(f"shard {number} of {split} would hold {len(shard)} bytes, more than "
                        f"{MAX_SHARD_BYTES}; use a smaller --images-per-shard")
    members = _members(shard)
    images = [m for m in members if not m.name.endswith(".cls")]
    record = {"number": number, "plan": _plan_digest(plan), "samples": len(kept),
              "bytes": len(shard), "sha256": hashlib.sha256(shard).hexdigest(),
              "offsets": [m.offset_data for m in images], "sizes": [m.size for m in images],
              "crcs": [crc for _, crc in kept], "labels": [label for label, _ in kept],
              "left_out": left_out}
    name = shard_name(split, number)
    if kept:
        _write(fs, f"{root}/{name}", shard)
        _write(fs, f"{root}/{name[:-4]}.idx", _dali_index(members))
    _write(fs, f"{root}/{split}/done/{name.rsplit('/', 1)[1][:-4]}.json",
           json.dumps(record).encode())
    return record


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, no owner names: the same bytes each time
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _members(shard: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(shard), mode="r") as tar:
        return tar.getmembers()


def _dali_index(members: list[tarfile.TarInfo]) -> bytes:
    """DALI's webdataset index (its wds2idx format v1.2): one line per sample, `<ext> <offset>
    <size> <member name>` for each of its files."""
    lines, sample, key = [], [], None
    for m in members:
        stem, ext = m.name.rsplit(".", 1)
        if stem != key and sample:
            lines.append(" ".join(sample))
            sample = []
        key = stem
        sample += [ext, str(m.offset_data), str(m.size), m.name]
    if sample:
        lines.append(" ".join(sample))
    return f"v1.2 {len(lines)}\n{chr(10).join(lines)}\n".encode()


def _plan_digest(plan: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _done_records(fs: Any, folder: str) -> dict[int, dict[str, Any]]:
    try:
        names = [p for p in fs.ls(folder, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    records = {}
    for path in names:
        try:
            record = json.loads(fs.cat_file(path))
            records[int(record["number"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # written by no finished shard: that shard is written again
    return records


@functools.cache
def _open(url: str, endpoint_url: str, what: str) -> tuple[Any, str]:
    return open_url(url, endpoint_url, what)


def _write(fs: Any, path: str, data: bytes) -> None:
    """Whole or not at all: one PUT on object storage, a rename on a file system."""
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, data)
        else:
            fs.pipe_file(path, data)
    except Exception as e:
        where = path if is_local(fs) else fs.unstrip_protocol(path)
        raise UserError(f"cannot write {where} ({type(e).__name__}: {e}); "
                        "check --out, --endpoint-url and the credentials") from e


def _label_type(index: SampleIndex) -> type:
    return np.int16 if len(index.classes) <= np.iinfo(np.int16).max else np.int32


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
