"""Data on one S3-compatible server, checkpoints on another: each client keeps its own endpoint.

botocore applies AWS_ENDPOINT_URL to every client made without an endpoint of its own, so a data
loader that exported the data's endpoint for the whole process would send the checkpoints and the
lease of a run whose checkpoints are on AWS (checkpoint.endpoint_url empty) to the data's server.
Two real moto servers here, with a bucket of the same name on each: an object sent to the wrong
server lands there instead of failing, and the listings of both show it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from conftest import unavailable

from pipeline.config import load_config
from pipeline.data.shard_writer import prepare_shards
from pipeline.data.verify import verify_split
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.storage.local_s3 import local_s3_server
from pipeline.train.trainer import train

EMPTY = Path(__file__).parent / "empty_config.yaml"
# 3 classes x 12 training images, batch 4: 9 steps, a checkpoint every 3.
TINY = ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 4}",
        "data.image_size=32", "data.augment=small", "data.batch_size=4", "data.workers=0",
        "train.epochs=1", "train.log_every=3", "train.amp=none", "checkpoint.every_steps=3",
        "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def checkpoint_server(s3_server: str) -> Iterator[str]:
    """A second moto server beside the data's (`s3_server`)."""
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def buckets(s3_bucket: str, s3_server: str, checkpoint_server: str
            ) -> tuple[s3fs.S3FileSystem, s3fs.S3FileSystem, str]:
    """(data server's client, checkpoint server's client, s3:// bucket that both servers have)."""
    data_fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    checkpoint_fs = s3fs.S3FileSystem(endpoint_url=checkpoint_server)
    checkpoint_fs.mkdir(s3_bucket.removeprefix("s3://"))
    return data_fs, checkpoint_fs, s3_bucket


@pytest.fixture
def no_endpoint_in_env(monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def objects(fs: s3fs.S3FileSystem, bucket: str) -> list[str]:
    fs.invalidate_cache()
    return [key.removeprefix(bucket.removeprefix("s3://") + "/") for key in fs.find(bucket)]


def train_on_two_servers(data_root: str, bucket: str, data_endpoint: str,
                         checkpoint_endpoint: str, tmp_path: Path, *extra: str) -> None:
    train(load_config(str(EMPTY), [
        f"data.root={data_root}", f"data.endpoint_url={data_endpoint}",
        f"checkpoint.url={bucket}/run", f"checkpoint.endpoint_url={checkpoint_endpoint}",
        f"out_dir={tmp_path / 'out'}", "name=two-servers", *TINY, *extra]))


def assert_each_object_on_its_server(data_fs, checkpoint_fs, bucket: str,
                                     data_objects: list[str], checkpoint_endpoint: str) -> None:
    assert objects(data_fs, bucket) == data_objects  # nothing of the run on the data's server
    written = objects(checkpoint_fs, bucket)
    assert written and all(key.startswith("run/") for key in written), written
    store = CheckpointStore(f"{bucket}/run", endpoint_url=checkpoint_endpoint)
    assert [info.step for info in store.list() if info.problem is None] == [3, 6, 9]
    assert "AWS_ENDPOINT_URL" not in os.environ


def test_torch_loader_reads_shards_from_one_server_and_checkpoints_go_to_the_other(
        image_folder: Path, buckets, s3_server: str, checkpoint_server: str, tmp_path: Path,
        no_endpoint_in_env) -> None:
    data_fs, checkpoint_fs, bucket = buckets
    prepare_shards(image_folder, f"{bucket}/shards", images_per_shard=8, workers=1,
                   endpoint_url=s3_server)
    data_objects = objects(data_fs, bucket)
    assert data_objects and all(key.startswith("shards/") for key in data_objects)

    train_on_two_servers(f"{bucket}/shards/shards.json", bucket, s3_server, checkpoint_server,
                         tmp_path, "data.backend=torch", f"data.cache_dir={tmp_path / 'cache'}")
    assert_each_object_on_its_server(data_fs, checkpoint_fs, bucket, data_objects,
                                     checkpoint_server)


def test_dali_reads_images_from_one_server_and_checkpoints_go_to_the_other(
        image_folder: Path, buckets, s3_server: str, checkpoint_server: str, tmp_path: Path,
        no_endpoint_in_env) -> None:
    """DALI's reader has its own S3 client, made from AWS_ENDPOINT_URL: the variable is set only
    while that client is made. `data verify`'s workers get the endpoint as an argument."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        unavailable("needs nvidia-dali-cuda130 (make install)")
    data_fs, checkpoint_fs, bucket = buckets
    data_fs.put(str(image_folder), f"{bucket}/imagenet", recursive=True)
    data_objects = objects(data_fs, bucket)

    result = verify_split(f"{bucket}/imagenet", "val", out=tmp_path / "lists", workers=2,
                          endpoint_url=s3_server)
    assert result.images == 12 and result.bad == {}
    assert "AWS_ENDPOINT_URL" not in os.environ

    train_on_two_servers(f"{bucket}/imagenet", bucket, s3_server, checkpoint_server, tmp_path,
                         "data.backend=dali", "data.dali_device=cpu")
    assert_each_object_on_its_server(data_fs, checkpoint_fs, bucket, data_objects,
                                     checkpoint_server)
