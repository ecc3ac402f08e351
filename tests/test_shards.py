"""Tar shards (pipeline/data/shards.py, shard_writer.py, shard_reader.py): the converter, both
back ends reading them from disk and from the real S3 server, the order's exactness across a
resize, its shuffle, and bad data inside shards."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import Proxy

from pipeline.config import DataConfig
from pipeline.data import build_loader
from pipeline.data.sampler import Blocks, ResumableSampler
from pipeline.data.shard_writer import prepare_shards
from pipeline.data.shards import load_shard_index
from pipeline.errors import UserError

REPO = Path(__file__).parent.parent


def shard_cfg(root: str, tmp_path: Path, **kw) -> DataConfig:
    base = dict(root=root, image_size=32, augment="small", batch_size=4, workers=0,
                shard_block=2, shuffle_window=3, cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**base, **kw})


def epoch_ids(loader) -> list[int]:
    return [i for *_, ids in loader.batches_with_indices() for i in ids.tolist()]


@pytest.fixture
def shards(tmp_path: Path, image_folder: Path) -> Path:
    """image_folder (3 classes x 12 train, 4 val) as shards of 5 images: 8 train, 3 val."""
    prepare_shards(image_folder, tmp_path / "shards", images_per_shard=5, workers=1)
    return tmp_path / "shards"


# --- the converter -----------------------------------------------------------------------------


def test_conversion_writes_webdataset_shards_index_and_manifest(shards: Path,
                                                                image_folder: Path) -> None:
    manifest = json.loads((shards / "shards.json").read_text())
    assert manifest["classes"] == ["ant", "bee", "cat"]
    train = manifest["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [5] * 7 + [1]
    index = load_shard_index(str(shards / "shards.json"), "train")
    seen = set()
    for s, entry in enumerate(train["shards"]):
        data = (shards / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            # WebDataset naming: <class>/<stem>.jpg then <class>/<stem>.cls, the label in text
            assert all(a.endswith(".jpg") and b == a[:-4] + ".cls"
                       for a, b in zip(names[::2], names[1::2]))
            for k, (image, cls) in enumerate(zip(members[::2], members[1::2])):
                i = index.starts[s] + k
                jpeg = tar.extractfile(image).read()
                # the table points at the image's bytes, with its label and crc32
                assert data[index.offsets[i]:index.offsets[i] + index.sizes[i]] == jpeg
                assert int(tar.extractfile(cls).read()) == index.labels[i]
                source = image_folder / "train" / (image.name[:-4] + ".JPEG")
                assert jpeg == source.read_bytes()
                assert ["ant", "bee", "cat"][index.labels[i]] == image.name.split("/")[0]
                seen.add(image.name)
        # DALI's index: "v1.2 <samples>", then per sample `jpg <offset> <size> <name> cls ...`
        lines = (shards / entry["name"].replace(".tar", ".idx")).read_text().splitlines()
        assert lines[0] == f"v1.2 {entry['samples']}"
        first = lines[1].split()
        assert first[0] == "jpg" and int(first[1]) == index.offsets[index.starts[s]]
        assert first[2:5] == [str(index.sizes[index.starts[s]]), names[0], "cls"]
    assert len(seen) == 36  # every image once
    assert manifest["splits"]["val"]["identity"]["images_per_class"] == [4, 4, 4]


def test_conversion_is_deterministic_and_class_order_is_an_option(
        tmp_path: Path, image_folder: Path, shards: Path) -> None:
    prepare_shards(image_folder, tmp_path / "again", images_per_shard=5, workers=2)
    for path in shards.rglob("*"):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(shards)).read_bytes() == \
                path.read_bytes(), path
    prepare_shards(image_folder, tmp_path / "sorted", images_per_shard=5, order="sorted",
                   workers=1)
    labels = load_shard_index(str(tmp_path / "sorted" / "shards.json"), "train").labels
    shuffled = load_shard_index(str(shards / "shards.json"), "train").labels
    assert list(labels) == sorted(labels) and list(shuffled) != sorted(shuffled)


def test_dalis_own_webdataset_reader_reads_the_shards_and_their_index(
        shards: Path, image_folder: Path) -> None:
    dali = pytest.importorskip("nvidia.dali", reason="needs nvidia-dali-cuda130 (make install)")
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))

    @dali.pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipeline():
        return tuple(dali.fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"],
            missing_component_behavior="error"))

    pipe = pipeline()
    pipe.build()
    read = []
    for _ in range(6):
        jpegs, labels = pipe.run()
        read += [(jpegs.at(k).tobytes(), int(labels.at(k).tobytes())) for k in range(6)]
    classes = ["ant", "bee", "cat"]
    source = [(p.read_bytes(), classes.index(p.parent.name))
              for p in (image_folder / "train").rglob("*.JPEG")]
    assert sorted(read) == sorted(source)


def test_a_deleted_shard_is_written_again_by_the_same_command(image_folder: Path,
                                                              shards: Path) -> None:
    # what `data verify` and the loader advise for a truncated or changed shard
    bad, good = shards / "train" / "shard-000003.tar", shards / "train" / "shard-000004.tar"
    before, untouched = bad.read_bytes(), good.stat().st_mtime_ns
    bad.unlink()
    prepare_shards(image_folder, shards, images_per_shard=5, workers=1)
    assert bad.read_bytes() == before and good.stat().st_mtime_ns == untouched
    load_shard_index(str(shards / "shards.json"), "train")  # whole again


def test_undecodable_images_are_left_out_and_listed(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "train" / "bee" / "bee_003.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    summary = prepare_shards(image_folder, tmp_path / "out", images_per_shard=5, workers=1)
    assert summary["splits"]["train"] == {"samples": 35, "shards": 8, "left_out": 1}
    manifest = json.loads((tmp_path / "out" / "shards.json").read_text())
    [bad] = manifest["splits"]["train"]["left_out"]
    assert bad["file"] == "bee/bee_003.JPEG" and bad["error"]
    index = load_shard_index(str(tmp_path / "out" / "shards.json"), "train")
    assert len(index) == 35 and index.left_out == 1


def test_conversion_to_s3_resumes_after_a_kill_writing_nothing_twice(
        tmp_path: Path, image_folder: Path, shards: Path, s3_server: str, s3_bucket: str) -> None:
    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]), report=True)
    proxy.start()
    out = f"{s3_bucket}/imagenet-shards"
    command = [sys.executable, "-m", "pipeline", "prepare", "shards", str(image_folder), "--out",
               out, "--images-per-shard", "5", "--workers", "1", "--endpoint-url",
               proxy.endpoint]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    try:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        # killed for real once three shards are whole: their done records (written last) stored
        after = 0
        for _ in range(3):
            put = proxy.wait_for(r"received (\d+) PUT \S*/train/done/", after=after)
            after = proxy.lines.index(put.string) + 1
            proxy.wait_for(rf"answered {put.group(1)} HTTP\S* 2", after=after)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = len(proxy.lines)
        # the shards whose records were stored before the kill (three, or one more that
        # finished before the signal landed)
        lines = proxy.lines[:killed_at]
        done = [f"train/{line.split()[3].rsplit('/', 1)[1][:-5]}"
                for j, line in enumerate(lines)
                if re.match(r"received \d+ PUT \S*/train/done/", line)
                and any(re.match(rf"answered {line.split()[1]} HTTP\S* 2", later)
                        for later in lines[j + 1:])]
        assert len(done) >= 3
        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"train: {len(done)} of 8 shards are done already" in second.stdout + \
            second.stderr
    finally:
        proxy.stop()
    puts = [line.split()[3] for line in proxy.lines if line.startswith("request")
            and line.split()[2] == "PUT" and line.split()[3].endswith(".tar")]
    assert len(set(puts)) == 11  # 8 train + 3 val shards
    again = [p for p in puts[len([1 for line in proxy.lines[:killed_at]
                                  if line.startswith("request") and " PUT " in line
                                  and line.split()[3].endswith(".tar")]):]]
    # the finished ones are not uploaded again; only a shard in flight at the kill may be
    assert not [p for p in again if any(p.endswith(f"/{name}.tar") for name in done)]
    assert len(again) >= 11 - len(done)
    # the same bytes as the conversion to local disk
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    remote = json.loads(fs.cat_file(f"{out}/shards.json"))
    assert remote == json.loads((shards / "shards.json").read_text())


# --- reading shards ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_back_ends_read_every_sample_once_with_its_label(
        tmp_path: Path, shards: Path, where: str, backend: str, s3_server: str,
        s3_bucket: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="needs nvidia-dali-cuda130 (make install)")
    root = str(shards / "shards.json")
    proxy = None
    if where == "s3":
        import s3fs

        s3fs.S3FileSystem(endpoint_url=s3_server).put(str(shards), f"{s3_bucket}/shards",
                                                      recursive=True)
        proxy = Proxy(int(s3_server.rsplit(":", 1)[1]), report=True)
        proxy.start()
        root = f"{s3_bucket}/shards/shards.json"
    try:
        # torch from S3 with DataLoader workers: the reader in forked workers, the prefetcher here
        cfg = shard_cfg(root, tmp_path, endpoint_url=proxy.endpoint if proxy else "",
                        backend=backend, workers=2 if proxy and backend == "torch" else 0)
        loader = build_loader(cfg, "train", train=True, seed=1)
        index = loader.reader.index
        loader.set_epoch(0)
        batches = list(loader.batches_with_indices())
        ids = [i for *_, b in batches for i in b.tolist()]
        assert len(ids) == len(set(ids)) == 36  # 9 whole batches of 4
        labels = [lab for _, b, _ in batches for lab in b.tolist()]
        assert labels == [index.labels[i] for i in ids]
        images = batches[0][0]
        assert images.shape == (4, 3, 32, 32) and images.std() > 0
        val = build_loader(cfg, "val", train=False, rank=1, world_size=2)
        assert len(epoch_ids(val)) == 6  # rank 1's half of the 12
        reads = len(proxy.lines) if proxy else 0
        # the blocks stay in the node-local cache: another loader's epoch reads none again
        again = build_loader(cfg, "train", train=True, seed=2)
        again.set_epoch(0)
        assert sorted(epoch_ids(again)) == list(range(36))
        assert again.reader.fetched_bytes == 0
    finally:
        if proxy:
            proxy.stop()
    if proxy:
        gets = [line.split()[3] for line in proxy.lines[:reads] if line.startswith("request")
                and " GET " in line and ".tar" in line]
        assert not [line for line in proxy.lines[reads:] if " GET " in line and ".tar" in line]
        # one ranged GET per block of <= 2 samples of a shard, never one per image: train's 22
        # blocks once each; val's rank 1 reads its 3 blocks (of 7) and one more for its share
        # of the uneven tail
        train = [g for g in gets if "/train/" in g]
        assert len(train) == len(index.blocks(2)) - 1 == 22
        assert len(gets) - len(train) <= 4
        assert loader.reader.fetched_bytes > 0


def cached_bytes(cache: Path) -> int:
    """The bytes of the blocks in the cache now. The reader's threads fetch and delete blocks
    meanwhile: a block listed but deleted before its size is read is no longer held."""
    total = 0
    for f in cache.iterdir():
        if f.suffix != ".lock":
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
    return total


def test_the_cache_stays_within_its_budget(tmp_path: Path, shards: Path, s3_server: str,
                                           s3_bucket: str) -> None:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_server).put(str(shards), f"{s3_bucket}/shards",
                                                  recursive=True)
    # room for ~3 blocks of 2 samples (~5 KB each): the rank deletes the blocks it is done with
    cfg = shard_cfg(f"{s3_bucket}/shards/shards.json", tmp_path, endpoint_url=s3_server,
                    cache_gb=15e-6, prefetch=2)
    loader = build_loader(cfg, "train", train=True)
    cache = Path(loader.reader.cache_dir)
    loader.set_epoch(0)
    held = []
    ids = []
    for *_, batch in loader.batches_with_indices():
        ids += batch.tolist()
        held.append(cached_bytes(cache))
    assert sorted(ids) == list(range(36))
    blocks = len(loader.reader.bounds) - 1
    assert loader.reader.fetched_bytes > 0 and len(held) == 9
    # never more than the budget plus the blocks in use and fetched ahead
    largest_block = max(int(loader.reader.index.byte_range(a, b - 1)[1]
                            - loader.reader.index.byte_range(a, b - 1)[0])
                        for a, b in zip(loader.reader.bounds[:-1], loader.reader.bounds[1:]))
    in_use = 8  # the windows (3 blocks) in use and next, and the 2 fetched ahead
    assert max(held) <= 15_000 + in_use * largest_block
    assert held[-1] < blocks * largest_block / 2  # most of the epoch's blocks are gone


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_2_then_1_then_3_ranks_yields_every_remaining_sample_once(
        tmp_path: Path, shards: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="needs nvidia-dali-cuda130 (make install)")

    def loaders(world: int, batch: int, state: dict | None) -> list:
        out = []
        for rank in range(world):
            loader = build_loader(shard_cfg(str(shards / "shards.json"), tmp_path,
                                            batch_size=batch, backend=backend), "train",
                                  train=True, rank=rank, world_size=world, seed=5)
            loader.set_epoch(2)
            if state:
                loader.load_state_dict(state)
            out.append(loader)
        return out

    seen: list[int] = []

    def run(group: list, steps: int | None) -> dict:
        iters = [g.batches_with_indices() for g in group]
        for _ in range(steps if steps is not None else group[0].batches_left):
            for it in iters:
                _, labels, ids = next(it)
                seen.extend(ids.tolist())
        states = [g.state_dict() for g in group]
        assert all(s == states[0] for s in states)
        return states[0]

    state = run(loaders(2, 2, None), 3)  # 12 samples on 2 ranks, the run's 2 streams
    assert state == {"epoch": 2, "consumed": 12, "num_samples": 36, "streams": 2, "blocks": 22,
                     "window": 3}
    state = run(loaders(1, 3, state), 2)  # 6 more on 1 rank
    assert state["consumed"] == 18 and state["streams"] == 2
    run(loaders(3, 2, state), None)  # the 18 left on 3 ranks: 3 steps of 6
    assert len(seen) == len(set(seen)) == 36
    # the order is the run's, whatever the ranks: each part of the resumed epoch is the same
    # part of the order one rank reads uninterrupted with the run's 2 streams
    [one] = loaders(1, 2, None)
    one.sampler.blocks = Blocks(one.sampler.blocks.bounds, 2, one.sampler.blocks.window)
    uninterrupted = epoch_ids(one)
    for part in (slice(0, 12), slice(12, 18), slice(18, 36)):
        assert set(seen[part]) == set(uninterrupted[part])


def test_a_manifest_named_without_its_folder(tmp_path: Path, shards: Path, monkeypatch) -> None:
    monkeypatch.chdir(shards)
    loader = build_loader(shard_cfg("shards.json", tmp_path), "train", train=True)
    loader.set_epoch(0)
    assert sorted(epoch_ids(loader)) == list(range(36))


def test_a_run_moves_between_a_folder_and_its_shards(tmp_path: Path, shards: Path,
                                                     image_folder: Path, caplog) -> None:
    on_shards = build_loader(shard_cfg(str(shards / "shards.json"), tmp_path), "train",
                             train=True)
    on_folder = build_loader(shard_cfg(str(image_folder), tmp_path), "train", train=True)
    assert on_shards.identity == on_folder.identity  # the resume check sees one data set
    on_folder.set_epoch(1)
    next(iter(on_folder))
    on_shards.load_state_dict(on_folder.state_dict())
    assert "position is in the order of an image folder; epoch 1 goes on" in caplog.text
    assert len(epoch_ids(on_shards)) == 32  # the rest of the epoch: 8 of its 9 batches


def test_a_rank_reads_its_own_streams_blocks() -> None:
    # ImageNet-like: shards of 1,000 in blocks of 128 (the last of each 104), a run started on
    # 4 ranks (4 streams)
    bounds = np.array([*(b for s in range(0, 100_000, 1000) for b in range(s, s + 1000, 128)),
                       100_000])
    order = Blocks(bounds, streams=4, window=16).order(seed=1, epoch=0, shuffle=True)
    assert np.array_equal(np.sort(order), np.arange(100_000))
    block_of = np.searchsorted(bounds, order, side="right") - 1
    for ranks in (4, 2):  # as started, and resumed on 2 (each holding 2 of the streams)
        reader = np.arange(len(order)) % ranks
        foreign = 0  # samples a rank reads from a block that another rank reads most of
        for block in range(len(bounds) - 1):
            counts = np.bincount(reader[block_of == block], minlength=ranks)
            foreign += counts.sum() - counts.max()
        # only the tail where the streams' lengths differ is read by another rank
        assert foreign < 0.01 * len(order), (ranks, foreign)


def chi_square_per_batch(labels: np.ndarray, classes: int, batch: int) -> float:
    """The mean over batches of the chi-square of a batch's label histogram against uniform."""
    expected = batch / classes
    scores = [((np.bincount(b, minlength=classes) - expected) ** 2 / expected).sum()
              for b in labels[: len(labels) // batch * batch].reshape(-1, batch)]
    return float(np.mean(scores))


def test_shuffle_mixes_batches_like_a_full_permutation_and_states_its_reach() -> None:
    # 100 classes x 128 images in blocks of 32; the folder loader's full permutation is the
    # yardstick: for a uniform mix the mean chi-square is about classes - 1
    classes, per_class, block, batch = 100, 128, 32, 64
    in_class_order = np.repeat(np.arange(classes), per_class)
    bounds = np.arange(0, len(in_class_order) + 1, block)
    folder = ResumableSampler(len(in_class_order), shuffle=True, seed=0).order()
    full = chi_square_per_batch(in_class_order[np.asarray(folder)], classes, batch)
    assert abs(full - (classes - 1)) < 10

    def score(labels: np.ndarray, window: int, streams: int) -> float:
        order = Blocks(bounds, streams, window).order(seed=0, epoch=0, shuffle=True)
        return chi_square_per_batch(labels[order], classes, batch) / full

    # shards as the converter writes them by default (images permuted once): as mixed as the
    # full permutation, whatever the window
    converted = in_class_order[np.random.default_rng(0).permutation(len(in_class_order))]
    assert all(score(converted, w, s) < 1.1 for w, s in ((1, 1), (16, 1), (16, 4)))
    # shards in class order (--order sorted): a batch mixes the window x streams blocks it is
    # drawn from, so it looks uniform only where those are many more than the classes
    assert score(in_class_order, 1, 1) > 20
    assert score(in_class_order, 16, 1) > 3
    assert score(in_class_order, 64, 4) < 1.25


# --- bad data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_shards_are_refused_or_counted_in_one_line(tmp_path: Path, shards: Path,
                                                       backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="needs nvidia-dali-cuda130 (make install)")
    root = str(shards / "shards.json")
    cfg = shard_cfg(root, tmp_path, max_bad_fraction=0.2, backend=backend)
    manifest = json.loads((shards / "shards.json").read_text())
    shard = shards / manifest["splits"]["train"]["shards"][1]["name"]
    data = shard.read_bytes()
    # a byte of an image changed in place (same size): its sample is bad, named and skipped
    index = load_shard_index(root, "train")
    i = int(index.starts[1])
    offset = int(index.offsets[i]) + 100
    shard.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
    loader = build_loader(cfg, "train", train=True)
    loader.set_epoch(0)
    ids = epoch_ids(loader)
    assert i not in ids and len(ids) == len(set(ids)) == 35  # 9 batches of 4, one short
    [bad] = loader.bad_files
    assert bad.startswith(f"{shard}#{index.classes[index.labels[i]]}/") and bad.endswith(".jpg")
    # truncated: refused before the first batch
    shard.write_bytes(data[:-1024])
    with pytest.raises(UserError, match=r"1 shard\(s\) .* not the size the manifest says.*"
                                        r"shard-000001.tar"):
        build_loader(cfg, "train", train=True)
    shard.unlink()
    with pytest.raises(UserError, match=r"names 1 shard\(s\) that are missing: "
                                        r"train/shard-000001.tar"):
        build_loader(cfg, "train", train=True)
    (shards / "shards.json").write_text('{"format": "anytime-pipeline-shards/1", "classes": []}')
    with pytest.raises(UserError, match="not a valid shard manifest .*classes"):
        build_loader(cfg, "train", train=True)
    with pytest.raises(UserError, match="no shard manifest at .*prepare shards"):
        build_loader(shard_cfg(str(tmp_path / "nowhere" / "shards.json"), tmp_path), "train",
                     train=True)


def test_storage_down_mid_epoch_ends_the_run_in_one_line(tmp_path: Path, shards: Path,
                                                         s3_server: str, s3_bucket: str,
                                                         monkeypatch) -> None:
    import s3fs

    import pipeline.data.shard_reader as shard_reader
    from pipeline.storage.retry import StorageError

    s3fs.S3FileSystem(endpoint_url=s3_server).put(str(shards), f"{s3_bucket}/shards",
                                                  recursive=True)
    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.start()
    monkeypatch.setattr(shard_reader, "_RETRY_DELAY", 0.05)  # the workers fork with it
    cfg = shard_cfg(f"{s3_bucket}/shards/shards.json", tmp_path, endpoint_url=proxy.endpoint,
                    workers=2, prefetch=0)
    loader = build_loader(cfg, "train", train=True)
    loader.set_epoch(0)
    batches = loader.batches_with_indices()
    next(batches)
    proxy.stop()  # the store is gone for good: every connection cut
    try:
        with pytest.raises(StorageError) as failed:
            for _ in batches:
                pass
    finally:
        proxy.stop()
    message = str(failed.value)
    # Stop the loader's persistent workers now (about 3 s: they are still retrying the store),
    # not in a garbage collection at the end of the session, where pytest-xdist's worker gives
    # its shutdown 5 s and then interrupts itself.
    del loader, batches, failed
    gc.collect()
    assert "\n" not in message and "Traceback" not in message, message
    assert "reading bytes" in message and "/shards/train/shard-" in message


def test_data_verify_names_each_problem_inside_shards(tmp_path: Path, shards: Path,
                                                      capsys) -> None:
    from pipeline.__main__ import main

    root = str(shards / "shards.json")
    assert main(["data", "verify", root, "--workers", "1"]) == 0
    assert "train: 8 shards, 36 samples: no problem(s)" in capsys.readouterr().out
    index = load_shard_index(root, "train")
    path = [shards / s.name for s in index.shards]
    # shard 0: a byte of its first image changed
    data = bytearray(path[0].read_bytes())
    data[int(index.offsets[0]) + 50] ^= 0xFF
    path[0].write_bytes(bytes(data))
    # shard 1: its second sample's .cls renamed (a sample without its label)
    data = bytearray(path[1].read_bytes())
    i = int(index.starts[1]) + 1
    header = (int(index.offsets[i]) + int(index.sizes[i]) + 511) // 512 * 512
    name = bytes(data[header:header + 100]).split(b"\0")[0]
    assert name.endswith(b".cls")
    data[header + len(name) - 3:header + len(name)] = b"txt"
    data[header + 148:header + 156] = b"        "
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])
    path[1].write_bytes(bytes(data))
    # shard 2 cut short in its last image; shard 3 gone
    path[2].write_bytes(path[2].read_bytes()[: int(index.offsets[index.starts[3] - 1]) + 20])
    path[3].unlink()
    assert main(["data", "verify", root, "--splits", "train", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert lines[:8] == [
        "train: 8 shards, 36 samples: 7 problem(s)",
        f"{path[0]}: its sha256 is not the manifest's: it changed after conversion",
        f"{path[0]}#{index.classes[index.labels[0]]}/{first_stem(path[0])}.jpg: its bytes "
        "differ from those converted (crc32)",
        f"{path[1]}: its sha256 is not the manifest's: it changed after conversion",
        f"{path[1]}#{name.decode()[:-4]}: no .cls file",
        f"{path[2]}: {path[2].stat().st_size} bytes, the manifest says {index.shards[2].bytes}: "
        "it is truncated or was replaced",
        f"{path[2]}: not a whole tar file (ReadError: unexpected end of data)",
        f"{path[3]}: missing"], out


def first_stem(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        return tar.getmembers()[0].name.split("/", 1)[1][:-4]


def test_an_out_that_cannot_be_written_is_named(image_folder: Path, s3_server: str) -> None:
    with pytest.raises(UserError, match=r"cannot write s3://no-such-bucket-here/shards/train/"
                                        r"shard-000000.tar .*check --out, --endpoint-url"):
        prepare_shards(image_folder, "s3://no-such-bucket-here/shards", images_per_shard=5,
                       workers=1, endpoint_url=s3_server)
