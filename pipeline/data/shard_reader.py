"""Reading samples out of tar shards (pipeline/data/shards.py) for both back ends.

Shards on a file system (local disk, Lustre, GPFS) are read in place: one positioned read per
image, no metadata operation. Shards in object storage are read a block at a time: one ranged
GET brings a run of `data.shard_block` consecutive samples into a node-local cache
(`data.cache_dir`), from which the images are read; `Prefetcher` fetches the blocks of this
rank's order ahead of use (`data.prefetch` blocks beyond those in use, `data.fetch_threads` at
once). Several processes of a node share the cache: a block is downloaded once, under a file
lock, by whichever process needs it first, written under a temporary name and renamed. Each
rank keeps its blocks within its share of `data.cache_gb` by deleting the blocks whose last use
in its order is past, oldest first; a block deleted while another rank still needs it is
fetched again (bytes, never correctness).

Every image read is checked against the crc32 that the converter recorded: a shard changed
after conversion gives bad samples (named, counted and skipped by the loader's bad-image policy,
pipeline/data/badimages.py), not wrong data. Storage that fails past the retries ends the run
with one line (StorageError) at the batch that needed it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sampler import Blocks
from pipeline.data.shards import TAR_BLOCK, ShardIndex, member_name
from pipeline.storage.atomic import write_atomically
from pipeline.storage.retry import StorageError, retry_storage
from pipeline.storage.urls import open_url

log = logging.getLogger(__name__)

_RETRIES, _RETRY_DELAY = 4, 1.0  # ~15 s of an outage per block before the run stops
_OPEN_SHARDS = 64  # shard files a process keeps open


class BadSample(Exception):
    """A sample whose bytes are not those the manifest recorded."""


class ShardReader:
    """The encoded image of sample i, from its shard (in place) or its block (object storage).
    Picklable state only, plus per-process handles opened on first use: a forked DataLoader
    worker opens its own."""

    def __init__(self, index: ShardIndex, bounds: np.ndarray, *, cache_dir: str = ""):
        self.index = index
        self.bounds = bounds  # first sample of each block, then len(index)
        self.remote = index.is_remote
        self.cache_dir = _cache_folder(index, cache_dir) if self.remote else ""
        self.fetched_bytes = 0  # downloaded by this process
        self._pid = -1
        self._files: dict[str, int] = {}
        self._fs: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # for spawned workers: no handles, no lock
        state = self.__dict__.copy()
        state.update(_pid=-1, _files={}, _fs=None, _lock=None)
        return state

    # --- what the loaders call -----------------------------------------------------------------

    def read(self, i: int) -> bytes:
        """Sample i's image bytes; BadSample when they are not the ones converted."""
        data = self._bytes(i, int(self.index.offsets[i]), int(self.index.sizes[i]))
        if len(data) != self.index.sizes[i] or zlib.crc32(data) != self.index.crcs[i]:
            raise BadSample(f"its bytes differ from those converted (crc32); {self.shard_name(i)} "
                            "changed after `prepare shards`: run `python -m pipeline data "
                            "verify` on the manifest")
        return data

    def name(self, i: int) -> str:
        """How messages name sample i: `<shard URL>#<member name>`, read from its tar header."""
        try:
            header = self._bytes(i, int(self.index.offsets[i]) - TAR_BLOCK, TAR_BLOCK)
            return f"{self.shard_name(i)}#{member_name(header)}"
        except Exception:  # naming a sample never fails the run
            return f"{self.shard_name(i)}#sample-{i}"

    def shard_name(self, i: int) -> str:
        return self.index.shard_url(self.index.shard_of(i))

    def block_of(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right")) - 1

    # --- the node-local cache ------------------------------------------------------------------

    def block_path(self, block: int) -> str:
        first, end = int(self.bounds[block]), int(self.bounds[block + 1])
        shard = self.index.shards[self.index.shard_of(first)].name.replace("/", "_")
        return f"{self.cache_dir}/{shard}.{first}-{end}"

    def fetch(self, block: int) -> int:
        """Make sure block `block` is in the cache; returns the bytes downloaded (0 if it was
        there). Any process, any thread: one download per node, under the block's file lock."""
        path = self.block_path(block)
        if os.path.exists(path):
            return 0
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process's download of it ends first
            if os.path.exists(path):
                return 0
            first, end = int(self.bounds[block]), int(self.bounds[block + 1])
            start, stop = self.index.byte_range(first, end - 1)
            url = self.index.shard_url(self.index.shard_of(first))
            fs = self._filesystem()
            data = retry_storage(lambda: fs.cat_file(url, start=start, end=stop),
                                 f"reading bytes {start}-{stop}", url, retries=_RETRIES,
                                 delay=_RETRY_DELAY, log=log)
            write_atomically(path, data)  # readers never see a part of it
        with self._lock:
            self.fetched_bytes += len(data)
        return len(data)

    def evict(self, blocks: list[int]) -> int:
        """Delete these blocks from the cache; returns the bytes freed."""
        freed = 0
        for block in blocks:
            path = self.block_path(block)
            try:
                freed += os.path.getsize(path)
                os.unlink(path)
            except FileNotFoundError:
                pass
        return freed

    # --- per-process handles -------------------------------------------------------------------

    def _bytes(self, i: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of sample i's shard: read in place, or from its block."""
        if not self.remote:
            return self._pread(self._local_shard(self.index.shard_of(i)), offset, size)
        block = self.block_of(i)
        start = self.index.byte_range(int(self.bounds[block]), int(self.bounds[block + 1]) - 1)[0]
        return self._pread_block(block, offset - start, size)

    def _here(self) -> None:
        if self._pid != os.getpid():  # a forked worker: its own files, client and lock
            for fd in self._files.values():  # the parent's, inherited: this process's copies
                os.close(fd)
            self._pid, self._files, self._fs = os.getpid(), {}, None
            self._lock = threading.Lock()

    def _filesystem(self) -> Any:
        self._here()
        if self._fs is None:
            # our retries (fetch) the only ones: an outage ends the run when they are spent
            self._fs = open_url(self.index.base, self.index.endpoint_url, "data.root",
                                single_attempt=True)[0]
        return self._fs

    def _local_shard(self, s: int) -> str:
        url = self.index.shard_url(s)
        return url[len("file://"):] if url.startswith("file://") else url

    def _pread(self, path: str, offset: int, size: int) -> bytes:
        self._here()
        fd = self._files.get(path)
        if fd is None:
            if len(self._files) >= _OPEN_SHARDS:  # ImageNet has 1,282: keep within ulimit -n
                for open_fd in self._files.values():
                    os.close(open_fd)
                self._files.clear()
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def _pread_block(self, block: int, offset: int, size: int) -> bytes:
        path = self.block_path(block)
        for attempt in range(4):  # not fetched yet, or evicted by another rank since: fetch it
            try:
                with open(path, "rb") as f:
                    return os.pread(f.fileno(), size, offset)
            except FileNotFoundError:
                if attempt < 3:
                    self.fetch(block)
        raise StorageError(f"block {path} kept disappearing from the node's cache (ranks or runs "
                           "sharing it evict each other's blocks); raise data.cache_gb or give "
                           "each run its own data.cache_dir")


class Prefetcher:
    """Fetches this rank's blocks ahead of use in a background thread, and deletes the ones it
    is done with when its cache share is full.

        prefetcher = Prefetcher(reader, order, ahead=16, threads=8, in_flight=512)
        prefetcher.advance(handed_out)   # samples of `order` handed out so far
        prefetcher.close()
    """

    def __init__(self, reader: ShardReader, order: np.ndarray, *, ahead: int, threads: int,
                 in_flight: int, budget: int):
        self.reader = reader
        blocks = np.searchsorted(reader.bounds, order, side="right") - 1
        # each block's first and last use in this order
        unique, first = np.unique(blocks, return_index=True)
        last = len(blocks) - 1 - np.unique(blocks[::-1], return_index=True)[1]
        by_first = np.argsort(first, kind="stable")
        self.blocks = unique[by_first]  # in order of first use
        self.first_use = first[by_first]
        self.last_use = dict(zip(unique.tolist(), last.tolist()))
        self.ahead, self.in_flight, self.budget = ahead, in_flight, budget
        self.handed_out = 0
        self.held: dict[int, int] = {}  # blocks this rank fetched -> bytes
        self._changed = threading.Condition()
        self._stop = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-fetch")
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def advance(self, handed_out: int) -> None:
        with self._changed:
            self.handed_out = handed_out
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _target(self) -> int:
        """How many blocks, in order of first use, should be in the cache now."""
        needed = int(np.searchsorted(self.first_use, self.handed_out + self.in_flight,
                                     side="right"))
        return min(len(self.blocks), needed + self.ahead)

    def _run(self) -> None:
        submitted = 0
        try:
            while True:
                with self._changed:
                    while not self._stop and submitted >= self._target():
                        self._changed.wait()
                    if self._stop:
                        return
                    target = self._target()
                futures = [(int(b), self._pool.submit(self.reader.fetch, int(b)))
                           for b in self.blocks[submitted:target]]
                submitted = target
                for block, future in futures:
                    try:
                        future.result()
                        # held whoever fetched it (a worker that needed it first, another rank)
                        self.held[block] = os.path.getsize(self.reader.block_path(block))
                    except FileNotFoundError:  # deleted by another rank meanwhile: not held
                        pass
                    except Exception as e:  # the loader's own read of it retries, or ends the run
                        log.warning("prefetching block %d of %s failed (%s: %s); it is read "
                                    "when needed", block, self.reader.index.split_dir,
                                    type(e).__name__, e)
                self._trim()
        except BaseException:  # a bug here must not pass unseen: prefetching stops, reads go on
            log.exception("the shard prefetcher stopped; blocks are read when needed")

    def _trim(self) -> None:
        """Over budget: delete held blocks that this order is done with, the earliest done
        first."""
        total = sum(self.held.values())
        if total <= self.budget:
            return
        done_before = self.handed_out - self.in_flight
        finished = sorted((self.last_use.get(b, -1), b) for b in self.held
                          if self.last_use.get(b, -1) < done_before)
        for _, block in finished:
            if total <= self.budget:
                break
            total -= self.reader.evict([block])
            del self.held[block]


def local_world_size() -> int:
    """The processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, else srun's
    SLURM_NTASKS_PER_NODE (its first figure: "4(x2)"), else 1."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1")
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        return 1


def _cache_folder(index: ShardIndex, cache_dir: str) -> str:
    """One folder per data set (its manifest's URL and sample table's crc32s) and split, on
    node-local disk."""
    root = cache_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                     f"anytime-pipeline-cache-{os.getuid()}")
    digest = zlib.crc32(index.url.encode()) ^ zlib.crc32(index.crcs.tobytes())
    return f"{root}/{digest:08x}-{index.split}"


def shard_blocks(cfg: DataConfig, index: ShardIndex, *, train: bool, world_size: int) -> Blocks:
    """The order of `index` read in data.shard_block blocks: training shuffles data.shuffle_window
    blocks together over one stream per rank (a resume keeps the run's streams: Loader
    .load_state_dict); evaluation reads the blocks in order, rank r the r-th of each turn."""
    if train and index.order == "sorted" and cfg.shuffle_window * world_size < 4 * len(
            index.classes):
        log.warning("%s holds its images in class order: a batch mixes only the %d blocks of "
                    "data.shuffle_window x ranks, few for %d classes, so batches will hold few "
                    "classes; convert it again without --order sorted", index.url,
                    cfg.shuffle_window * world_size, len(index.classes))
    return Blocks(index.blocks(cfg.shard_block), streams=world_size,
                  window=cfg.shuffle_window if train else 1)


def start_prefetch(cfg: DataConfig, reader: ShardReader, order: np.ndarray,
                   in_flight: int) -> Prefetcher | None:
    """A Prefetcher for this rank's `order` (None for shards read in place); `in_flight`: the
    samples a back end may read ahead of those it handed out."""
    if not reader.remote:
        return None
    local_ranks = max(1, local_world_size())
    return Prefetcher(reader, order, ahead=cfg.prefetch, threads=cfg.fetch_threads,
                      in_flight=in_flight, budget=int(cfg.cache_gb * 1e9 / local_ranks))
