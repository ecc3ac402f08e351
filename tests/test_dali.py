"""The DALI loader on real JPEG files: its CPU operators here, 'mixed' GPU decode where a GPU is.

Sample sequences are compared through `batches_with_indices()`, which names each image by its
index in the split.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN, consume_across_resize, unavailable
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import build_loader, position_from_step
from pipeline.data.dali import DaliLoader
from pipeline.data.sampler import ResumableSampler
from pipeline.errors import UserError

try:
    import nvidia.dali  # noqa: F401
except ImportError:
    unavailable("needs nvidia-dali-cuda130 (make install)", module_level=True)


def dali_cfg(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), backend="dali", image_size=32, augment="small", batch_size=4,
                workers=2)
    return DataConfig(**{**base, **kw})


def epoch_indices(loader: DaliLoader) -> list[int]:
    return [i for _, _, ids in loader.batches_with_indices() for i in ids.tolist()]


def truncate(path: Path, keep: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_train_batches_follow_the_seeded_global_order(image_folder: Path) -> None:
    loader = build_loader(dali_cfg(image_folder, batch_size=5), "train", train=True, seed=7)
    assert isinstance(loader, DaliLoader) and not loader.gpu
    assert loader.classes == ["ant", "bee", "cat"] and len(loader) == 7  # 36 // 5
    loader.set_epoch(2)
    batches = list(loader.batches_with_indices())
    assert len(batches) == 7
    for images, labels, ids in batches:
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.tolist() == [i // 12 for i in ids.tolist()]
    sampler = ResumableSampler(36, shuffle=True, seed=7)
    sampler.set_epoch(2)
    assert torch.cat([ids for *_, ids in batches]).tolist() == list(sampler)[:35]

    # The same order as the torch loader: switching back end changes no sample sequence.
    torch_loader = build_loader(dali_cfg(image_folder, batch_size=5, backend="torch", workers=0),
                                "train", train=True, seed=7)
    torch_loader.set_epoch(2)
    assert torch.cat([y for _, y in torch_loader]).tolist() == \
        torch.cat([y for _, y, _ in batches]).tolist()
    loader.set_epoch(3)
    assert epoch_indices(loader) != list(sampler)[:35]


@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_have_equal_steps_and_cover_the_epoch(make_image_folder, world) -> None:
    root = make_image_folder(counts={"train": 11})  # 33 images: shards are padded by wrapping
    cfg = dali_cfg(root, batch_size=3)
    shards = []
    for rank in range(world):
        loader = build_loader(cfg, "train", train=True, rank=rank, world_size=world, seed=1)
        loader.set_epoch(1)
        shards.append(epoch_indices(loader))
    per_rank = -(-33 // world) // 3 * 3
    assert [len(s) for s in shards] == [per_rank] * world
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen) >= 33 - world * 3 + 1  # only whole batches, no repeats


@pytest.mark.parametrize("world,batch", [(1, 5), (2, 5), (3, 2), (4, 4)])
def test_validation_counts_every_image_exactly_once(image_folder: Path, world, batch) -> None:
    cfg = dali_cfg(image_folder, batch_size=batch)
    seen = []
    for rank in range(world):
        loader = build_loader(cfg, "val", train=False, rank=rank, world_size=world)
        loader.set_epoch(0)
        batches = list(loader.batches_with_indices())
        assert len(batches) == len(loader)
        assert all(len(ids) <= batch for *_, ids in batches)
        seen += torch.cat([ids for *_, ids in batches]).tolist()
    assert sorted(seen) == list(range(12))


@pytest.mark.parametrize("stop", [1, 4, 9])
def test_resume_mid_epoch_gives_the_uninterrupted_sequence(image_folder: Path, stop) -> None:
    cfg = dali_cfg(image_folder, augment="imagenet", image_size=24, batch_size=2)
    whole = build_loader(cfg, "train", train=True, seed=3, rank=1, world_size=2)
    whole.set_epoch(4)
    expected = epoch_indices(whole)

    interrupted = build_loader(cfg, "train", train=True, seed=3, rank=1, world_size=2)
    interrupted.set_epoch(4)
    it = interrupted.batches_with_indices()
    before = [next(it)[2] for _ in range(stop)]
    state = interrupted.state_dict()
    del it, interrupted  # the process dies here
    assert state == {"epoch": 4, "consumed": stop * 2 * 2, "num_samples": 36}

    resumed = build_loader(cfg, "train", train=True, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    after = epoch_indices(resumed)
    assert torch.cat(before).tolist() + after == expected
    # A checkpoint without loader state: the position follows from the step (9 steps an epoch).
    again = build_loader(cfg, "train", train=True, seed=3, rank=1, world_size=2)
    again.load_state_dict(position_from_step(4 * 9 + stop, epoch=4, num_samples=36,
                                             batch_size=2, world_size=2))
    assert epoch_indices(again) == after


@pytest.mark.parametrize("old,new,steps", [((2, 3), (1, 3), 2), ((1, 3), (2, 3), 4),
                                           ((2, 3), (3, 2), 2)])
def test_resume_on_another_world_size_consumes_every_sample_once(image_folder: Path, old, new,
                                                                 steps) -> None:
    def build(rank: int, world: int, batch: int) -> DaliLoader:
        return build_loader(dali_cfg(image_folder, batch_size=batch, workers=1), "train",
                            train=True, rank=rank, world_size=world, seed=3)

    before, after, state = consume_across_resize(build, old, new, steps)
    assert state == {"epoch": 1, "consumed": 12, "num_samples": 36}
    assert sorted(i for i, _ in before + after) == list(range(36))
    assert all(label == i // 12 for i, label in before + after)


def test_normalisation_layout_and_dtype(tmp_path: Path) -> None:
    # PNG is lossless and the images are one colour, so resize and crop keep the exact values.
    for split in ("train", "val"):
        for c, colour in (("a", (255, 0, 128)), ("b", (10, 200, 30))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 16), colour).save(tmp_path / split / c / f"{i}.png")
        Image.new("L", (16, 16), 77).save(tmp_path / split / "a" / "gray.png")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    expected = [(255, 0, 128), (255, 0, 128), (77, 77, 77), (10, 200, 30), (10, 200, 30)]
    want = torch.stack([(torch.tensor(c) / 255 - torch.tensor(mean)) / torch.tensor(std)
                        for c in expected])[:, :, None, None].expand(5, 3, 16, 16)

    cfg = dali_cfg(tmp_path, image_size=16, batch_size=8, mean=mean, std=std)
    images, labels = next(iter(build_loader(cfg, "val", train=False)))
    assert labels.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(images, want, atol=1e-5, rtol=0)

    fp16 = dali_cfg(tmp_path, image_size=16, batch_size=8, mean=mean, std=std,
                    dtype="float16", channels_last=True)
    images, _ = next(iter(build_loader(fp16, "val", train=False)))
    assert images.dtype == torch.float16 and images.shape == (5, 3, 16, 16)
    assert images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images.float(), want, atol=2e-2, rtol=0)


def test_imagenet_augmentation_on_larger_images(make_image_folder) -> None:
    root = make_image_folder(size=64, counts={"train": 4, "val": 2})
    cfg = dali_cfg(root, augment="imagenet", image_size=24, batch_size=4)
    train = build_loader(cfg, "train", train=True)
    crops = [x for x, _ in train]
    assert all(x.shape == (4, 3, 24, 24) for x in crops)
    train.set_epoch(1)
    assert not torch.equal(torch.cat(crops), torch.cat([x for x, _ in train]))
    val = [x for x, _ in build_loader(cfg, "val", train=False)]
    assert [x.shape[0] for x in val] == [4, 2]  # the last batch is trimmed, not padded
    assert all(x.shape[1:] == (3, 24, 24) for x in val)


def test_corrupt_jpeg_is_skipped_named_and_counted(image_folder: Path, caplog) -> None:
    truncate(image_folder / "train" / "bee" / "bee_003.JPEG")  # index 15
    (image_folder / "train" / "cat" / "cat_005.JPEG").write_bytes(b"not a jpeg at all")  # 29
    cfg = dali_cfg(image_folder, batch_size=4, max_bad_fraction=0.2)
    loader = build_loader(cfg, "train", train=True, seed=2)
    sampler = ResumableSampler(36, shuffle=True, seed=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        with caplog.at_level(logging.WARNING):
            seen = epoch_indices(loader)
        assert seen == [i for i in sampler if i not in (15, 29)]
        assert loader.batches_left == 0 and len(loader) == 9
    assert sorted(loader.bad_files) == [str(image_folder / "train" / "bee" / "bee_003.JPEG"),
                                        str(image_folder / "train" / "cat" / "cat_005.JPEG")]
    assert loader.seen == 72
    assert "bee_003.JPEG" in caplog.text and "cat_005.JPEG" in caplog.text

    strict = build_loader(dali_cfg(image_folder, batch_size=4, max_bad_fraction=0.01), "train",
                          train=True, seed=2)
    with pytest.raises(UserError, match=r"failed to decode.*data verify"):
        list(strict)


def test_verify_lists_bad_images_and_loaders_leave_them_out(image_folder: Path) -> None:
    truncate(image_folder / "train" / "ant" / "ant_002.JPEG")
    (image_folder / "val" / "cat" / "cat_001.JPEG").write_bytes(b"\xff\xd8garbage")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "verify", str(image_folder),
                           "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # it found bad images
    assert "train: 35 of 36 images decode" in proc.stdout
    assert "not an image format PIL can read" in proc.stdout and "object at 0x" not in proc.stdout
    assert "val: 11 of 12 images decode" in proc.stdout
    assert "ant/ant_002.JPEG" in proc.stdout and "cat/cat_001.JPEG" in proc.stdout
    good = (image_folder / "train.txt").read_text().splitlines()
    assert len(good) == 35 and good[0] == "ant/ant_000.JPEG 0" and "ant/ant_002.JPEG 0" not in good
    assert (image_folder / "train.bad.txt").read_text().startswith("ant/ant_002.JPEG\t")

    for backend in ("dali", "torch"):
        cfg = dali_cfg(image_folder, backend=backend, batch_size=5, workers=2 if backend ==
                       "dali" else 0)
        train = build_loader(cfg, "train", train=True)
        assert train.num_samples == 35 and len(list(train)) == 7
        val = build_loader(cfg, "val", train=False)
        assert sum(len(y) for _, y in val) == 11
        assert train.bad_files == val.bad_files == []  # never met during the run


def test_verify_lists_elsewhere_for_a_read_only_root(image_folder: Path, tmp_path: Path) -> None:
    truncate(image_folder / "val" / "bee" / "bee_000.JPEG")
    lists = tmp_path / "lists"
    from pipeline.__main__ import main

    assert main(["data", "verify", str(image_folder), "--out", str(lists), "--splits", "val"]) == 1
    assert sorted(p.name for p in lists.iterdir()) == ["val.bad.txt", "val.txt"]
    cfg = dali_cfg(image_folder, file_lists=str(lists))
    assert build_loader(cfg, "val", train=False).num_samples == 11
    assert build_loader(dali_cfg(image_folder), "val", train=False).num_samples == 12


def test_dali_is_refused_with_a_clear_message_when_it_cannot_run(image_folder: Path) -> None:
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_loader(dali_cfg(image_folder, batch_size=64), "train", train=True)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            build_loader(dali_cfg(image_folder, dali_device="gpu"), "train", train=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="'mixed' decode needs a CUDA GPU")
def test_mixed_decode_on_the_gpu(make_image_folder) -> None:
    root = make_image_folder(size=64)
    cfg = dali_cfg(root, augment="imagenet", image_size=32, batch_size=6, dtype="float16",
                   channels_last=True)
    loader = build_loader(cfg, "train", train=True)
    assert loader.gpu
    batches = list(loader.batches_with_indices())
    assert len(batches) == 6
    for images, _, _ in batches:
        assert images.is_cuda and images.shape == (6, 3, 32, 32)
    val = build_loader(cfg, "val", train=False)
    assert sum(len(y) for _, y in val) == 12


def test_synthetic_loader_matches_the_real_epoch(image_folder: Path) -> None:
    cfg = dali_cfg(image_folder, backend="synthetic", batch_size=5)
    train = build_loader(cfg, "train", train=True, rank=1, world_size=2)
    real = build_loader(dali_cfg(image_folder, batch_size=5), "train", train=True, rank=1,
                        world_size=2)
    assert len(train) == len(real) == 3 and train.classes == real.classes
    batches = list(train)
    assert len(batches) == 3
    images, labels = batches[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert images.shape == (5, 3, 32, 32) and images.device.type == device
    assert labels.max() < 3
    train.load_state_dict({"epoch": 0, "consumed": 2 * 5 * 2, "num_samples": 36})
    assert len(list(train)) == 1  # the 16 images left: one step of 5 x 2
    val = build_loader(cfg, "val", train=False, rank=0, world_size=5)
    assert [len(y) for _, y in val] == [3]  # images 0, 5, 10 of 12
    imagenet = build_loader(dali_cfg(image_folder / "nothing", backend="synthetic",
                                     batch_size=256), "train", train=True)
    assert len(imagenet.classes) == 1000 and len(imagenet) == 1_281_167 // 256


def test_bench_loader_prints_images_per_second(image_folder: Path, capsys) -> None:
    from pipeline.__main__ import main

    for backend in ("dali", "torch", "synthetic", "decode"):
        assert main(["bench", "loader", "--backend", backend, "--data", str(image_folder),
                     "--batch-size", "4", "--image-size", "24", "--workers", "2", "--batches",
                     "5", "--warmup", "1"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(("dali on cpu", "torch on cpu", "synthetic on", "decode-only"))
        assert float(out.strip().rsplit(": ", 1)[1].split()[0]) > 0 and "images/s" in out


@pytest.mark.slow
def test_train_end_to_end_with_dali_on_two_processes(image_folder: Path, tmp_path: Path) -> None:
    # DDP over 2 CPU processes (gloo), a truncated JPEG in the training set: the run neither
    # hangs nor dies, names the image, counts every validation image once, and resumes.
    victim = image_folder / "train" / "bee" / "bee_007.JPEG"
    truncate(victim)
    run = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
           "--config", "configs/demo_fmnist_resnet_ann.yaml", f"data.root={image_folder}",
           "data.backend=dali", "data.workers=1", "data.image_size=32", "data.batch_size=3",
           "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.max_bad_fraction=0.1",
           "train.log_every=2", f"out_dir={tmp_path}", "name=dali"]
    proc = subprocess.run([*run, "train.epochs=1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # 36 images / (3 x 2)
    assert "batch 6 (3 x 2 processes)" in proc.stdout and "6 steps" in proc.stdout
    assert victim.name in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "dali" / "results.json").read_text())
    assert results["val_samples"] == 12 and len(results["exits"]) == 9
    resumed = subprocess.run([*run, "train.epochs=2", "resume=auto"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from" in resumed.stdout and "step 6" in resumed.stdout
    records = [json.loads(line) for line in
               (tmp_path / "dali" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]


def test_unknown_backend_names_the_choices(image_folder: Path) -> None:
    cfg: Callable[..., DataConfig] = dali_cfg
    bad = cfg(image_folder)
    bad.backend = "ffcv"
    with pytest.raises(UserError, match="torch, dali or synthetic"):
        build_loader(bad, "train", train=True)


def test_s3_data_root_is_read_by_dali_directly(image_folder: Path, s3_server: str,
                                               s3_bucket: str, monkeypatch) -> None:
    import s3fs

    # DALI makes its S3 client with AWS_ENDPOINT_URL set, then restores it; this test restores
    # it too, whatever the loader does
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")

    truncate(image_folder / "train" / "cat" / "cat_004.JPEG")  # index 28
    s3fs.S3FileSystem(endpoint_url=s3_server).put(str(image_folder), f"{s3_bucket}/imagenet",
                                                  recursive=True)
    (image_folder / "train" / "ignored.txt").write_text("")  # local and remote lists agree
    remote = dali_cfg(f"{s3_bucket}/imagenet", endpoint_url=s3_server, batch_size=5,
                      max_bad_fraction=0.1)
    local = dali_cfg(image_folder, batch_size=5, max_bad_fraction=0.1)
    for split, train in (("train", True), ("val", False)):
        loader = build_loader(remote, split, train=train, seed=4)
        assert loader.classes == ["ant", "bee", "cat"]
        assert str(loader.index.path(0)) == f"{s3_bucket}/imagenet/{split}/ant/ant_000.JPEG"
        batches = list(loader.batches_with_indices())
        reference = list(build_loader(local, split, train=train, seed=4).batches_with_indices())
        assert [ids.tolist() for *_, ids in batches] == [ids.tolist() for *_, ids in reference]
        for (x, *_), (x_local, *_) in zip(batches, reference):
            if not train:  # no random crops: the same pixels as from the local copy
                torch.testing.assert_close(x, x_local)
    assert loader.bad_files == []
    train_loader = build_loader(remote, "train", train=True, seed=4)
    list(train_loader)
    assert train_loader.bad_files == [f"{s3_bucket}/imagenet/train/cat/cat_004.JPEG"]

    # data verify reads the bucket too; its lists stay local.
    from pipeline.__main__ import main

    lists = image_folder.parent / "lists"
    assert main(["data", "verify", f"{s3_bucket}/imagenet", "--out", str(lists),
                 "--endpoint-url", s3_server, "--workers", "2"]) == 1
    assert (lists / "train.bad.txt").read_text().startswith("cat/cat_004.JPEG\t")
    verified = build_loader(dali_cfg(f"{s3_bucket}/imagenet", endpoint_url=s3_server,
                                     file_lists=str(lists)), "train", train=True)
    assert verified.num_samples == 35
    list(verified)
    assert verified.bad_files == []

    with pytest.raises(UserError, match="only data.backend=dali reads"):
        dali_cfg(f"{s3_bucket}/imagenet", backend="torch")  # refused with the config
    with pytest.raises(UserError, match="holds no <class>/<image> files"):
        build_loader(dali_cfg(f"{s3_bucket}/nothing", endpoint_url=s3_server), "train",
                     train=True)
    s3fs.S3FileSystem(endpoint_url=s3_server).rm(f"{s3_bucket}/imagenet/val/cat", recursive=True)
    with pytest.raises(UserError, match="different class folders .only in train: 'cat';"):
        build_loader(remote, "val", train=False)
    with pytest.raises(UserError, match="cannot list .* check the URL, data.endpoint_url"):
        build_loader(dali_cfg(f"{s3_bucket}/imagenet", endpoint_url="http://127.0.0.1:9"),
                     "train", train=True)  # storage down: nothing serves port 9


def test_verify_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from pipeline.__main__ import main

    assert main(["data", "verify", "s3://bucket/imagenet"]) == 2
    assert "needs --out DIR" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["data", "verify", str(tmp_path / "other")]) == 2
    assert "no train/ or val/ folder" in capsys.readouterr().err
