"""Checkpoint cost against its baselines, in one run, on a real S3-compatible server.

1. Upload throughput of `CheckpointStore.save` (serialise + sha256 + upload + manifest) against a
   raw s3fs `pipe_file` of the same bytes to the same server, in pairs whose order alternates;
   each order's ratio and their geometric mean. Goal: ratio >= 0.8.
2. Training-step time while an async save is in flight against steps without one.
   Goal: ratio <= 1.2.

    python benchmarks/bench_checkpoint.py [--endpoint-url URL] [--mb 200] [--pairs 12]

Without --endpoint-url it starts moto_server on 127.0.0.1 (pip install 'anytime-pipeline[dev]').
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import uuid

import s3fs
import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.anytime.loss import AnytimeLoss
from pipeline.config import CheckpointConfig, LossConfig
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.storage.local_s3 import local_s3_server
from pipeline.train.checkpointing import Checkpointer
from pipeline.train.state import RunState


def upload_ratio(endpoint: str, bucket: str, megabytes: int, pairs: int) -> None:
    state = {"model": {"w": torch.randn(megabytes * 2**20 // 4)}}
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    # One store, as in a run: its S3 client (its own, with no retries under the store's) is
    # connected by the run's first look at the folder, and its connections pooled save to save.
    store = CheckpointStore(f"s3://{bucket}/ckpt", endpoint_url=endpoint, keep_last=0)
    store.list()

    def raw(rep: int) -> float:
        started = time.perf_counter()
        fs.pipe_file(f"{bucket}/raw/{rep}.pt", payload)
        return time.perf_counter() - started

    def ours(rep: int) -> float:
        started = time.perf_counter()
        store.save(rep, state)
        return time.perf_counter() - started

    # The second upload of a pair runs slower on a small shared machine (the server still
    # digesting the first): the order alternates, and each order is reported, so that the
    # figure measures the store and not the order.
    times: dict[str, list[tuple[float, float]]] = {"raw first": [], "ours first": []}
    for rep in range(pairs):
        if rep % 2 == 0:
            r = raw(rep)
            times["raw first"].append((r, ours(rep)))
        else:
            o = ours(rep)
            times["ours first"].append((raw(rep), o))
    mb = len(payload) / 1e6
    ratios = {}
    for order, got in times.items():
        raw_rate = mb / statistics.median(r for r, _ in got)
        our_rate = mb / statistics.median(o for _, o in got)
        ratios[order] = our_rate / raw_rate
        print(f"upload of {mb:.0f} MB, {order}, median of {len(got)} pairs: raw s3fs put "
              f"{raw_rate:.0f} MB/s, CheckpointStore.save {our_rate:.0f} MB/s, "
              f"ratio {ratios[order]:.2f}")
    # An order's cost divides one ratio and multiplies the other: their geometric mean cancels it.
    both = statistics.geometric_mean(ratios.values())
    print(f"upload ratio, both orders (geometric mean): {both:.2f} (goal >= 0.8)")


def step_time_ratio(endpoint: str, bucket: str, megabytes: int, steps: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet_ann_cifar20", num_classes=10)
    criterion = AnytimeLoss(model.num_exits, LossConfig("sieve"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 28, 28), torch.randint(0, 10, (64,))
    ballast = torch.nn.Module()  # a bigger model's worth of bytes to upload
    ballast.register_buffer("bytes", torch.randn(megabytes * 2**20 // 4))

    def step() -> float:
        started = time.perf_counter()
        loss, _ = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    for _ in range(5):
        step()
    quiet = [step() for _ in range(steps)]
    store = CheckpointStore(f"s3://{bucket}/async", endpoint_url=endpoint, keep_last=2)
    run = RunState({"model": model, "optimizer": optimizer, "ballast": ballast}, rank=0, seed=0,
                   about={})
    checkpointer = Checkpointer(store, run, CheckpointConfig(async_save=True), writer=True)
    busy, saves = [], 0
    while len(busy) < steps:
        if not checkpointer.busy:
            run.step = saves
            checkpointer.save(end_of_epoch=False)
            saves += 1
        busy.append(step())
    checkpointer.close()
    ratio = statistics.median(busy) / statistics.median(quiet)
    print(f"training step (resnet_ann_cifar20, batch 64, CPU), median of {steps}: "
          f"{statistics.median(quiet) * 1e3:.1f} ms alone, {statistics.median(busy) * 1e3:.1f} ms "
          f"with a {megabytes} MB async save in flight ({saves} saves), ratio {ratio:.2f} "
          f"(goal <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-url", default="")
    parser.add_argument("--mb", type=int, default=200, help="checkpoint size in MB")
    parser.add_argument("--pairs", type=int, default=12,
                        help="upload pairs (raw put + save), half of them in each order")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be 2 or more: at least one pair in each order")
    server = (contextlib.nullcontext(args.endpoint_url) if args.endpoint_url
              else local_s3_server())
    with server as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        upload_ratio(endpoint, bucket, args.mb, args.pairs)
        step_time_ratio(endpoint, bucket, args.mb, args.steps)


if __name__ == "__main__":
    main()
