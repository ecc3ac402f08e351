"""The `dali` back end: NVIDIA DALI pipelines (pipeline/data/loader.py has the interface); images
on the GPU ('mixed' decode) or the CPU. Reads local files and `s3://` URLs.

Order and sharding come from the shared `ResumableSampler`, not from DALI's reader: DALI's
`random_shuffle` only shuffles a 1,024-sample buffer over a fixed file order, and
`shuffle_after_epoch` cannot be combined with `stick_to_shard`. So each epoch this rank's files,
in the order of the seeded global permutation, are given to `fn.readers.file(files=...)` in a
pipeline built for that epoch (building one takes ~10 ms), and a resume builds it from the first
sample not yet consumed: the sample sequence is exactly the one of an uninterrupted run. Crops and
flips after a resume are drawn afresh (the pipeline seed mixes run seed, epoch, rank and
position): unlike the torch back end, DALI has no per-sample seed, and restoring its RNG needs
DALI's own checkpoint, which would not survive a change of world size.

DALI 2.4.0's file reader opens `s3://` files itself (AWS SDK; credentials from the standard
chain: AWS_* variables, ~/.aws, instance roles). Its one S3 client per process takes its endpoint
from AWS_ENDPOINT_URL when it is made; `make_s3_client` sets the variable for just that moment, so
`data.endpoint_url` reaches no other client of the process (checkpoints, the lease).

Tar shards (pipeline/data/shards.py) come in through `fn.external_source` instead: the
pipeline's source hands it this rank's encoded images batch by batch, read by the project's
ShardReader (in place on a file system; from blocks prefetched into the node-local cache for
object storage), so the order stays the sampler's. DALI's own `fn.readers.webdataset` reads the
same files, but orders samples with its shuffle buffer over shards assigned to ranks, which no
resume on another number of ranks can reproduce (docs/data.md).

The reader's labels are sample indices (mapped to class labels here), so each batch knows its
files: that names bad images and lets tests compare sample sequences.

The last batch of a validation shard is trimmed to what is left (the reader pads it with
`pad_last_batch`; the padding is cut here).

Bad images: a decode failure stops a DALI pipeline and names no file. The loader then decodes
the failed batch's files with PIL, and rebuilds the pipeline at that batch with a good stand-in
file in place of each bad one; the stand-ins are dropped from the batch (which is then smaller),
and the bad files are logged by name and counted (pipeline/data/badimages.py). `python -m
pipeline data verify` lists bad images up front so that this never happens.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.badimages import decode_error, url_decode_error
from pipeline.data.index import SampleIndex
from pipeline.data.loader import Loader, RawBatch
from pipeline.data.sampler import mix_seed
from pipeline.data.shard_reader import BadSample, ShardReader, shard_blocks, start_prefetch
from pipeline.data.shards import ShardIndex
from pipeline.errors import UserError

log = logging.getLogger(__name__)

# nvJPEG's preallocation for ImageNet-sized images (DALI's ResNet-50 example), so the first
# batches do not reallocate.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREFETCH = 2  # DALI's queue depth: batches decoded ahead


def import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise UserError(
            "data.backend=dali needs NVIDIA DALI: pip install 'anytime-pipeline[dali]' "
            "(nvidia-dali-cuda130, the build for this torch's CUDA 13); or use data.backend=torch"
        ) from e
    from nvidia.dali import fn, pipeline_def, types

    return fn, pipeline_def, types


def use_gpu(cfg: DataConfig) -> bool:
    """'mixed' (GPU) decode only where a GPU is visible: DALI's GPU operators fail to build
    without one."""
    if cfg.dali_device == "gpu" and not torch.cuda.is_available():
        raise UserError("data.dali_device=gpu but no CUDA GPU is visible; use "
                        "data.dali_device=auto or cpu")
    return cfg.dali_device != "cpu" and torch.cuda.is_available()


_s3_endpoint: str | None = None  # what DALI's S3 client in this process was made for; None: none


def make_s3_client(endpoint_url: str, url: str) -> None:
    """Have DALI make its S3 client for `endpoint_url` ("" = as the environment says: AWS) by
    reading the object `url` once; at once if it exists already for that endpoint.

    DALI keeps one S3 client per process (S3ClientManager), made at its first s3:// read, which
    happens when a pipeline runs, not when it is built, from the AWS_ENDPOINT_URL of that moment.
    The variable is set around that one read and then restored: botocore applies it to every
    client made without an endpoint of its own, so left set it would send the checkpoints and the
    lease to the data's server. (Clients made meanwhile by other threads would take it too; the
    run's are made before its loaders.) A second endpoint cannot be served by the same client."""
    global _s3_endpoint
    if _s3_endpoint is not None:
        if _s3_endpoint != endpoint_url:
            raise UserError(
                f"data.endpoint_url={endpoint_url!r}, but DALI in this process already reads "
                f"s3:// from {_s3_endpoint or 'AWS'!r} (DALI has one S3 client per process); "
                "use one data.endpoint_url per process, or tar shards (which DALI does not read "
                "itself)")
        return
    fn, pipeline_def, _ = import_dali()

    @pipeline_def
    def read_one():
        return fn.readers.file(files=[url], labels=[0])[0]

    pipe = read_one(batch_size=1, num_threads=1, device_id=None)
    previous = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    try:
        pipe.build()
        _s3_endpoint = endpoint_url  # the read makes the client, also where the read fails
        pipe.run()
    except RuntimeError as e:  # DALI's message: the operator's traceback, then the S3 error
        detail = str(e).split("encountered:")[-1].split("Current pipeline object")[0]
        raise UserError(f"DALI cannot read {url} (data.endpoint_url={endpoint_url!r}): "
                        f"{' '.join(detail.split())}; check the URL, data.endpoint_url and the "
                        "AWS_* credentials") from e
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


def build_pipeline(cfg: DataConfig, files: list[str] | Iterator, labels: list[int], *,
                   train: bool, gpu: bool, seed: int, device_id: int | None, threads: int):
    """One DALI pipeline over `files` in this order, or over the batches of encoded images
    that `files` yields as (images, labels) when it is an iterator: decode (+ random-resized
    crop), flip, normalise. Outputs (images N x C x H x W or N x H x W x C, labels N x 1
    int32); `labels` are sample indices."""
    fn, pipeline_def, types = import_dali()
    size = cfg.image_size
    decode_device = "mixed" if gpu else "cpu"
    decode_args = dict(device=decode_device, output_type=types.RGB)
    if gpu:
        decode_args.update(device_memory_padding=_DEVICE_MEMORY_PADDING,
                           host_memory_padding=_HOST_MEMORY_PADDING)

    @pipeline_def
    def pipeline():
        if isinstance(files, list):
            jpegs, sample_ids = fn.readers.file(files=files, labels=labels,
                                                random_shuffle=False, pad_last_batch=True)
        else:  # the last batch may be smaller: an external source's batches need not be full
            jpegs, sample_ids = fn.external_source(source=files, num_outputs=2, batch=True,
                                                   dtype=[types.UINT8, types.INT32])
        crop = None
        if cfg.augment == "imagenet" and train:
            # Decode and crop fused: only the crop window is decoded (ROI decode).
            images = fn.decoders.image_random_crop(
                jpegs, random_area=list(cfg.crop_scale), random_aspect_ratio=list(cfg.crop_ratio),
                num_attempts=10, **decode_args)
            images = fn.resize(images, resize_x=size, resize_y=size)
        else:
            images = fn.decoders.image(jpegs, **decode_args)
            shorter = round(size / cfg.val_resize_ratio) if cfg.augment == "imagenet" else size
            images = fn.resize(images, resize_shorter=shorter)
            crop = (size, size)
        mirror = fn.random.coin_flip(probability=0.5) if train else 0
        images = fn.crop_mirror_normalize(
            images, crop=crop, mirror=mirror,
            dtype=types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
            output_layout="HWC" if cfg.channels_last else "CHW",
            mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std])
        return images, sample_ids

    pipe = pipeline(batch_size=cfg.batch_size, num_threads=threads, device_id=device_id,
                    seed=seed % 2**31, prefetch_queue_depth=_PREFETCH)
    pipe.build()
    return pipe


class DaliLoader(Loader):
    """Batches (NCHW images, int64 labels) of one split for one rank from DALI pipelines."""

    def __init__(self, cfg: DataConfig, index: SampleIndex | ShardIndex, *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, accumulation: int = 1):
        import_dali()
        shards = isinstance(index, ShardIndex)
        super().__init__(cfg, index.classes, len(index), source=str(index.split_dir),
                         train=train, rank=rank, world_size=world_size, seed=seed,
                         accumulation=accumulation,
                         blocks=shard_blocks(cfg, index, train=train, world_size=world_size)
                         if shards else None)
        self.reader = ShardReader(index, self.sampler.blocks.bounds, cache_dir=cfg.cache_dir
                                  ) if shards else None
        if not shards and index.is_remote:
            make_s3_client(cfg.endpoint_url, str(index.path(0)))
        self.cfg = cfg
        self.index = index
        self.gpu = use_gpu(cfg)
        self.device_id = torch.cuda.current_device() if self.gpu else None  # set by the trainer
        self.threads = max(1, cfg.workers)
        self._class_of = torch.from_numpy(index.labels.astype(np.int64))
        self.excluded: dict[int, str] = {}  # sample index -> decode error, found in this run

    def _load(self, indices: np.ndarray) -> Iterator[RawBatch]:
        bs, order = self.batch_size, indices.tolist()
        batches = math.ceil(len(order) / bs)
        first = self.consumed // (bs * self.world_size)  # the epoch's batch number of order[0]
        done = 0  # batches of `order` handed out
        # what DALI may have read ahead of the batches handed out: its queue and the one running
        prefetcher = start_prefetch(self.cfg, self.reader, indices, bs * (_PREFETCH + 2)) \
            if self.reader else None
        try:
            while done < batches:
                pipe = self._pipeline(order[done * bs :])
                try:
                    while done < batches:
                        try:
                            images, sample_ids = pipe.run()
                        except RuntimeError as e:  # a decode failure; DALI does not say which file
                            suspects = order[done * bs : (done + 1 + _PREFETCH) * bs]
                            self._find_bad(suspects, first + done, e)
                            break  # rebuild from this batch with the bad files replaced
                        n = min(bs, len(order) - done * bs)  # the last val batch is trimmed
                        ids = torch.from_numpy(np.array(sample_ids.as_tensor()))
                        ids = ids.reshape(-1)[:n].to(torch.int64)
                        images = self._to_torch(images)[:n]
                        keep = ids >= 0  # stand-ins for bad images are dropped
                        positions = (~keep).nonzero().reshape(-1).tolist()
                        bad = [(self._name(i), self.excluded[i])
                               for i in (order[done * bs + p] for p in positions)]
                        done += 1
                        if not keep.all():
                            images, ids = images[keep.to(images.device)], ids[keep]
                        yield images, self._class_of[ids], ids, bad
                        if prefetcher:
                            prefetcher.advance(done * bs)
                finally:
                    del pipe  # frees its threads and buffers before the next one is built
        finally:
            if prefetcher:
                prefetcher.close()

    def _pipeline(self, order: list[int]):
        seed = mix_seed(self.seed, self.epoch, self.rank, self.consumed)
        if self.reader:
            return build_pipeline(self.cfg, self._shard_batches(order), [], train=self.train,
                                  gpu=self.gpu, seed=seed, device_id=self.device_id,
                                  threads=self.threads)
        files, labels = [], []
        stand_in = self._stand_in(order)
        for i in order:
            good = i not in self.excluded
            files.append(str(self.index.path(i if good else stand_in)))
            labels.append(i if good else -1)
        return build_pipeline(self.cfg, files, labels, train=self.train, gpu=self.gpu, seed=seed,
                              device_id=self.device_id, threads=self.threads)

    def _stand_in(self, order: list[int]) -> int:
        stand_in = next((i for i in order if i not in self.excluded), None)
        if stand_in is None:
            raise UserError(f"no image of {self.index.split_dir} left in this epoch decodes; "
                            "run `python -m pipeline data verify` on the data root")
        return stand_in

    def _shard_batches(self, order: list[int]) -> Iterator[tuple[list, list]]:
        """The encoded images of `order` batch by batch, read from the shards; a sample whose
        bytes changed since conversion (or that was found not to decode) is replaced by a
        stand-in that is dropped from its batch."""
        stand_in: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            jpegs, ids = [], []
            for i in order[start : start + self.batch_size]:
                data = None
                if i not in self.excluded:
                    try:
                        data = np.frombuffer(self.reader.read(i), dtype=np.uint8)
                    except BadSample as e:
                        self.excluded[i] = str(e)
                if data is None:
                    if stand_in is None:
                        stand_in = self._stand_in_bytes(order)
                    data, i = stand_in, -1
                jpegs.append(data)
                ids.append(np.array([i], dtype=np.int32))
            yield jpegs, ids

    def _stand_in_bytes(self, order: list[int]) -> np.ndarray:
        """The bytes of the first sample of `order` that reads as converted."""
        while True:
            i = self._stand_in(order)  # a UserError when none is left
            try:
                return np.frombuffer(self.reader.read(i), dtype=np.uint8)
            except BadSample as e:
                self.excluded[i] = str(e)

    def _name(self, i: int) -> str:
        return self.reader.name(i) if self.reader else str(self.index.path(i))

    def _decode_error(self, i: int) -> str | None:
        if not self.reader and self.index.is_remote:
            return url_decode_error(str(self.index.path(i)), self.cfg.endpoint_url)
        if not self.reader:
            return decode_error(self.index.path(i))
        try:
            return decode_error(self.reader.read(i))
        except BadSample as e:
            return str(e)

    def _find_bad(self, suspects: list[int], batch: int, error: RuntimeError) -> None:
        """Find the files of the failed batch (or the ones decoded ahead of it) that do not
        decode, and exclude them from now on."""
        errors = {i: self._decode_error(i) for i in suspects if i not in self.excluded}
        found = {i: e for i, e in errors.items() if e is not None}
        if not found:
            first = str(error).strip().splitlines()
            raise UserError(
                f"DALI failed on batch {batch} of epoch {self.epoch} in "
                f"{self.index.split_dir}, but PIL decodes all of its files "
                f"({self._name(suspects[0])} ...): {' '.join(first[-3:])[:300]}; run "
                "`python -m pipeline data verify` on the data root, or use data.backend=torch"
            ) from error
        self.excluded.update(found)
        log.warning("DALI could not decode %d image(s) of batch %d, epoch %d: %s; continuing "
                    "without them", len(found), batch, self.epoch,
                    ", ".join(self._name(i) for i in found))
    def _to_torch(self, images) -> torch.Tensor:
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = images.as_tensor()
            dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
            out = torch.empty(tensor.shape(), dtype=dtype,
                              device=torch.device("cuda", self.device_id))
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        else:
            out = torch.from_numpy(np.array(images.as_tensor()))
        # NHWC in memory, viewed as NCHW: that is torch's channels_last format.
        return out.permute(0, 3, 1, 2) if self.cfg.channels_last else out

