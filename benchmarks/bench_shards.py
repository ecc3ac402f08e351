"""Tar shards against one object per image, in one run, on a real S3-compatible server with the
store's latency added by a delaying proxy (tests/tcp_proxy.py --delay; tc netem is not available
on these machines).

1. Writes (once) a folder of small ImageNet-like JPEGs (bench_loader.natural_image, 96x72),
   uploads it to moto_server one object per image, and converts it to shards there
   (`prepare shards`, 1,000 images per shard).
2. Reads a number of batches through the proxy, with the same threads, for:
   - one object per image, DALI (the only back end that reads such a folder from S3),
   - shards, DALI (fn.external_source fed by the ShardReader),
   - shards, torch (PIL + DataLoader workers),
   - and, for the choice of library, DALI's own fn.readers.webdataset on the same s3:// shards
     (its order: a shuffle buffer),
   printing images/s, GET requests per 1,000 images, bytes fetched per image, and the ratio of
   each shard reader to the per-object one.
3. Shuffle quality at ImageNet's proportions: a batch's label histogram against uniform.
4. A 1,281,167-sample manifest (ImageNet's train split: one real shard of 1,000 tiny images
   hard-linked 1,282 times, on local disk): seconds from start to the first batch, and the
   memory the index and the epoch's order take in the process (RSS growth).

    python benchmarks/bench_shards.py [--images 20000] [--size 96x72] [--delay 0.02] [--batches 10]

Goals (issue #23): shards >= 5x the per-object rate at 20 ms with the same threads; <= 1 request
per 100 images; first batch from a 1.28M-sample manifest in <= 10 s; index memory <= 40 MB.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_loader import natural_image  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import build_loader  # noqa: E402
from pipeline.data.bench import bench_loader  # noqa: E402
from pipeline.data.sampler import Blocks, ResumableSampler  # noqa: E402
from pipeline.data.shard_writer import prepare_shards  # noqa: E402
from pipeline.data.shards import FORMAT, load_shard_index  # noqa: E402
from pipeline.storage.local_s3 import free_port, local_s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = 100


def write_folder(root: Path, images: int, size: tuple[int, int] = (96, 72)) -> Path:
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        natural_image(rng, *size).save(folder / f"img_{i:06d}.JPEG", quality=85)
    (root / "done").write_text("")
    return root


class DelayingProxy:
    """tests/tcp_proxy.py in front of the server: `delay` seconds per request, GETs counted."""

    def __init__(self, target: str, delay: float):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "tcp_proxy.py"), str(self.port),
             target.rsplit(":", 1)[1], "0", "--report", "--delay", str(delay)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.gets = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("request") and " GET " in line:
                self.gets += 1

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()


def measure(name: str, cfg: DataConfig, proxy: DelayingProxy, batches: int) -> dict:
    """Images/s over `batches` batches after 2, and the GETs per image over all of them (for
    shards: a whole epoch, so that blocks prefetched ahead are all used)."""
    gets = proxy.gets
    result = bench_loader(cfg, batches=batches, warmup=2)
    images = (batches + 2) * cfg.batch_size
    result.update(name=name, gets_per_1000=1000 * (proxy.gets - gets) / images)
    print(f"{name:28s} {result['images_per_s']:8.0f} images/s  "
          f"{result['gets_per_1000']:7.1f} GETs per 1,000 images", flush=True)
    return result


def dali_webdataset(name: str, fs, shards: str, proxy: DelayingProxy, threads: int,
                    batch: int, batches: int) -> dict:
    """DALI's own fn.readers.webdataset over the same shards (s3:// paths and their index
    files, read by DALI's AWS SDK), decode and resize as ours: `batches` batches after one, in
    its own order."""
    from nvidia.dali import fn, pipeline_def, types

    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    tars = sorted(f"s3://{p}" for p in fs.ls(f"{shards}/train") if p.endswith(".tar"))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"],
            random_shuffle=True, initial_fill=1024, name="reader")
        images = fn.resize(fn.decoders.image(jpegs, device="cpu", output_type=types.RGB),
                           resize_x=64, resize_y=64)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW"), labels

    try:
        pipe = pipeline()
        pipe.build()
        pipe.run()  # fills its shuffle buffer (initial_fill): not counted
        gets = proxy.gets
        started = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        seconds = time.perf_counter() - started
    except Exception as e:  # recorded: what DALI's reader does with these URLs
        print(f"{name:28s} failed: {str(e).strip().splitlines()[-1][:200]}", flush=True)
        return {"name": name, "error": str(e)[:2000]}
    rate = batches * batch / seconds
    per_1000 = 1000 * (proxy.gets - gets) / (batches * batch)
    print(f"{name:28s} {rate:8.0f} images/s  {per_1000:7.1f} GETs per 1,000 images", flush=True)
    del pipe
    return {"name": name, "images_per_s": rate, "gets_per_1000": per_1000}


def shuffle_quality(batch: int = 256, classes: int = 1000, per_class: int = 1280,
                    block: int = 128) -> dict:
    """The mean chi-square of a global batch's label histogram against uniform (about
    classes - 1 for a uniform mix), at ImageNet's proportions, for the folder loader's full
    permutation and for shards read in blocks of 128 with data.shuffle_window blocks mixed per
    stream (a stream per rank of the run's first world size)."""
    def score(labels: np.ndarray) -> float:
        rows = labels[: len(labels) // batch * batch].reshape(-1, batch)[:2000]
        counts = np.stack([np.bincount(r, minlength=classes) for r in rows])
        expected = batch / classes
        return float(((counts - expected) ** 2 / expected).sum(1).mean())

    in_class_order = np.repeat(np.arange(classes), per_class)
    converted = in_class_order[np.random.default_rng(0).permutation(len(in_class_order))]
    bounds = np.arange(0, len(in_class_order) + 1, block)
    folder = np.asarray(ResumableSampler(len(in_class_order), shuffle=True, seed=0).order())
    result = {"folder, full permutation": score(in_class_order[folder])}
    for window, streams in ((16, 1), (16, 8), (64, 8)):
        order = Blocks(bounds, streams, window).order(seed=0, epoch=0, shuffle=True)
        where = f"window {window}, {streams} stream(s)"
        result[f"shards as converted, {where}"] = score(converted[order])
        result[f"shards in class order, {where}"] = score(in_class_order[order])
    print(f"shuffle: mean chi-square of a batch of {batch}'s labels ({classes} classes; "
          f"uniform: ~{classes - 1}):")
    for name, value in result.items():
        print(f"  {name:48s} {value:8.0f}  ({value / result['folder, full permutation']:.1f}x)")
    return result


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def imagenet_sized_manifest(folder: Path, samples: int = 1_281_167, per_shard: int = 1000) -> Path:
    """A valid manifest of `samples` samples whose shards are hard links of one real shard."""
    source = write_folder(folder / "one-shard-src", per_shard)
    one = prepare_shards(source, folder / "one", images_per_shard=per_shard, workers=1)
    manifest = json.loads(Path(one["manifest"]).read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    with np.load(folder / "one" / "train" / "samples.npz") as t:
        table = {k: t[k] for k in ("offsets", "sizes", "crcs")}
    shards = -(-samples // per_shard)
    out = folder / "imagenet"
    (out / "train").mkdir(parents=True, exist_ok=True)
    counts = [per_shard] * (shards - 1) + [samples - per_shard * (shards - 1)]
    rng = np.random.default_rng(0)
    arrays = {k: np.concatenate([v[:n] for n in counts]) for k, v in table.items()}
    arrays["labels"] = rng.integers(0, 1000, samples).astype(np.int16)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (out / "train" / "samples.npz").write_bytes(buffer.getvalue())
    entries = []
    for s, n in enumerate(counts):
        name = f"train/shard-{s:06d}.tar"
        if not (out / name).exists():
            os.link(folder / "one" / entry["name"], out / name)
        entries.append({**entry, "name": name, "samples": n})
    classes = [f"n{c:08d}" for c in range(1000)]
    identity = {"classes": classes, "files_sha256": "0" * 64,
                "images_per_class": np.bincount(arrays["labels"], minlength=1000).tolist()}
    (out / "shards.json").write_text(json.dumps({
        "format": FORMAT, "classes": classes, "options": manifest["options"],
        "splits": {"train": {"shards": entries, "identity": identity, "left_out": [],
                             "table": {"name": "train/samples.npz",
                                       "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}}}))
    return out / "shards.json"


def first_batch(manifest: Path) -> dict:
    cfg = DataConfig(root=str(manifest), batch_size=256, image_size=32, augment="small",
                     workers=0)
    # the modules a loader imports (torchvision, PIL) and its first-use buffers, on one shard
    warm = build_loader(replace(cfg, root=str(manifest.parent.parent / "one" / "shards.json")),
                        "train", train=True)
    warm.set_epoch(0)
    next(iter(warm))
    del warm
    gc.collect()
    before = rss_mb()
    tracemalloc.start()
    started = time.perf_counter()
    index = load_shard_index(str(manifest), "train")
    indexed = time.perf_counter() - started
    index_mb = tracemalloc.get_traced_memory()[0] / 1e6
    del index
    loader = build_loader(cfg, "train", train=True)
    loader.set_epoch(0)
    next(iter(loader))
    seconds = time.perf_counter() - started
    gc.collect()
    held_mb, peak_mb = (m / 1e6 for m in tracemalloc.get_traced_memory())
    tracemalloc.stop()
    grown = rss_mb() - before
    print(f"1,281,167-sample manifest: index loaded in {indexed:.2f} s, first batch after "
          f"{seconds:.2f} s (goal <= 10 s); memory: the index {index_mb:.0f} MB (goal <= 40 "
          f"MB), the loader with the epoch's order after its first batch {held_mb:.0f} MB "
          f"(peak {peak_mb:.0f} MB; RSS growth {grown:.0f} MB)", flush=True)
    return {"index_s": indexed, "first_batch_s": seconds, "index_mb": index_mb,
            "loader_mb": held_mb, "peak_mb": peak_mb, "rss_growth_mb": grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", default="96x72",
                        help="WIDTHxHEIGHT of the images (500x375: ImageNet-like, ~110 KB)")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per request")
    parser.add_argument("--batches", type=int, default=10,
                        help="batches of the per-object loader and of DALI's webdataset "
                             "reader (ours on shards: a whole epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI threads and DataLoader workers")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-shards"))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    work = Path(args.work)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    results: dict = {"images": args.images, "size": args.size, "delay_s": args.delay,
                     "threads": args.threads}

    results["shuffle_chi_square"] = shuffle_quality()
    results["manifest_1281167"] = first_batch(imagenet_sized_manifest(work / "big"))
    size = tuple(int(x) for x in args.size.split("x"))
    folder = write_folder(work / f"folder-{args.images}-{args.size}", args.images, size)
    import s3fs

    with local_s3_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(bucket)
        started = time.perf_counter()
        fs.put(str(folder / "train"), f"{bucket}/folder/train", recursive=True)
        print(f"uploaded {args.images} objects in {time.perf_counter() - started:.0f} s",
              flush=True)
        started = time.perf_counter()
        prepare_shards(folder, f"s3://{bucket}/shards", images_per_shard=1000,
                       endpoint_url=endpoint)
        print(f"converted to shards on S3 in {time.perf_counter() - started:.0f} s", flush=True)
        proxy = DelayingProxy(endpoint, args.delay)
        try:
            common = dict(image_size=64, augment="small", batch_size=args.batch_size,
                          workers=args.threads, endpoint_url=proxy.endpoint)
            runs = [("one object per image, dali", f"s3://{bucket}/folder", "dali"),
                    ("shards, dali", f"s3://{bucket}/shards/shards.json", "dali"),
                    ("shards, torch", f"s3://{bucket}/shards/shards.json", "torch")]
            rows = []
            epoch = args.images // args.batch_size - 2
            for name, root, backend in runs:
                cache = tempfile.mkdtemp(prefix="bench-shards-cache-")
                cfg = DataConfig(root=root, backend=backend, cache_dir=cache, **common)
                rows.append(measure(name, cfg, proxy, args.batches if "object" in name
                                    else epoch))
            rows.append(dali_webdataset("shards, DALI's webdataset", fs, f"{bucket}/shards",
                                        proxy, args.threads, args.batch_size, args.batches))
        finally:
            proxy.stop()
    base = rows[0]["images_per_s"]
    for row in rows[1:]:
        if "error" in row:
            continue
        row["ratio_to_per_object"] = row["images_per_s"] / base
        goal = "" if "webdataset" in row["name"] else " (goal >= 5x)"
        print(f"{row['name']}: {row['ratio_to_per_object']:.1f}x the per-object rate{goal}")
    results["loaders"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
