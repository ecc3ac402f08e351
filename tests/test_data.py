"""The folder index, the resumable sampler and the torch loader, on real JPEG files."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import consume_across_resize
from PIL import Image

import pipeline.data.badimages as badimages
from pipeline.config import DataConfig
from pipeline.data import build_loader
from pipeline.data.listing import check_same_classes, index_split
from pipeline.data.pil import PilLoader
from pipeline.data.sampler import ResumableSampler
from pipeline.errors import UserError


def small_cfg(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), image_size=32, augment="small", batch_size=4, workers=0)
    return DataConfig(**{**base, **kw})


# --- folder index -------------------------------------------------------------------------------


def test_index_is_sorted_and_ignores_non_images(image_folder: Path) -> None:
    (image_folder / "train" / "bee" / "notes.txt").write_text("not an image")
    (image_folder / "train" / "bee" / "._bee_000.JPEG").write_bytes(b"macOS metadata")
    Image.new("RGB", (8, 8)).save(image_folder / "train" / "ant" / "extra.png")

    index = index_split(image_folder, "train")

    assert index.classes == ["ant", "bee", "cat"]
    assert len(index) == 37
    assert index.sample(0) == ("ant/ant_000.JPEG", 0)
    assert index.sample(12) == ("ant/extra.png", 0)  # sorted by name within the class
    assert index.sample(13) == ("bee/bee_000.JPEG", 1)
    assert index.sample(36) == ("cat/cat_011.JPEG", 2)
    assert all(not rel.endswith(".txt") and ".hidden" not in rel for rel, _ in index.samples())
    assert index.path(0) == image_folder / "train" / "ant" / "ant_000.JPEG"


def test_missing_root_suggests_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        index_split(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value)
    assert f"python -m pipeline prepare fashion-mnist --out {tmp_path / 'nope'}" in str(e.value)


def test_missing_split_names_the_folder(image_folder: Path) -> None:
    expected = r"split folder .*test does not exist \(found: train, val\)"
    with pytest.raises(UserError, match=expected):
        index_split(image_folder, "test")


def test_split_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.JPEG")
    with pytest.raises(UserError, match=r"no class folders \(1 images lie directly in it\)"):
        index_split(tmp_path, "train")


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "train" / "dog").mkdir()
    (image_folder / "train" / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError) as e:
        index_split(image_folder, "train")
    assert str(image_folder / "train" / "dog") in str(e.value)
    assert "holds no images" in str(e.value)


def test_different_classes_are_named(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder(counts={"train": 1})
    make_image_folder(classes=("ant", "bee", "dog"), counts={"val": 1})
    train, val = index_split(root, "train"), index_split(root, "val")
    with pytest.raises(UserError, match=r"only in train: 'cat'; only in val: 'dog'"):
        check_same_classes(train, val)
    # build_loader checks a val split against train on its own
    with pytest.raises(UserError, match=r"only in train: 'cat'; only in val: 'dog'"):
        build_loader(small_cfg(root), "val", train=False)


# --- sampler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world,batch,passes", [(10, 1, 3, 1), (10, 3, 1, 1), (40, 4, 3, 1),
                                                  (40, 2, 3, 2), (50, 3, 2, 4)])
def test_training_shares_are_whole_global_batches_each_sample_once(
    n: int, world: int, batch: int, passes: int,
) -> None:
    steps = n // (world * batch * passes)
    for epoch in range(3):
        shards = []
        for rank in range(world):
            s = ResumableSampler(n, shuffle=True, seed=7, rank=rank, world_size=world,
                                 batch_size=batch, accumulation=passes)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) == steps * batch * passes  # the same on every rank
        flat = [i for x in shards for i in x]
        assert len(flat) == len(set(flat)) == steps * s.global_batch  # no padding, no repeats
        # the left-out partial global batch is the end of the epoch's order
        assert set(flat) == set(s.order()[: len(flat)].tolist())


def test_accumulated_passes_see_the_batches_of_the_ranks_they_replace() -> None:
    # Virtual ranks: pass j of rank r on W ranks takes what rank j x W + r takes without
    # accumulation, so 2 ranks x 1 pass, 1 rank x 2 passes and 4 ranks compute the same batches.
    def passes(world: int, accumulation: int, batch: int = 3) -> list[list[int]]:
        per_step: list[list[list[int]]] = []
        for rank in range(world):
            s = ResumableSampler(48, shuffle=True, seed=5, rank=rank, world_size=world,
                                 batch_size=batch, accumulation=accumulation)
            chunks = s.indices().reshape(-1, accumulation, batch)  # [step, pass, sample]
            per_step.append(chunks.tolist())
        # [step][virtual rank j x W + r] -> the pass's samples
        return [[per_step[v % world][step][v // world] for v in range(world * accumulation)]
                for step in range(len(per_step[0]))]

    two_ranks = passes(2, 1)
    assert passes(1, 2) == two_ranks
    assert len(two_ranks) == 8 and all(len(v) == 2 for v in two_ranks)
    assert passes(4, 1, batch=3) == passes(2, 2, batch=3) == passes(1, 4, batch=3)


@pytest.mark.parametrize("n,world", [(10, 3), (5, 8), (12, 4)])
def test_evaluation_sampler_sees_every_sample_exactly_once(n: int, world: int) -> None:
    shards = [list(ResumableSampler(n, shuffle=True, rank=r, world_size=world))
              for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        s = ResumableSampler(100, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(100))
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 1) != order(1, 0)  # not seed + epoch
    unshuffled = ResumableSampler(10, shuffle=False, rank=1, world_size=2)
    assert list(unshuffled) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("start", [0, 1, 5, 8])
@pytest.mark.parametrize("batch", [0, 2])
def test_sampler_resume_yields_the_tail(start: int, batch: int) -> None:
    def sampler() -> ResumableSampler:
        return ResumableSampler(50, shuffle=True, seed=3, rank=1, world_size=3, batch_size=batch)

    full = sampler()
    full.set_epoch(4)
    whole = list(full)
    per_step = batch or 1  # what each rank takes per step (evaluation: one sample at a time)
    resumed = sampler()
    resumed.set_epoch(4, consumed=start * per_step * 3)  # each of the 3 ranks took `start`
    assert list(resumed) == whole[start * per_step :]
    assert len(resumed) == len(whole) - start * per_step


def test_sampler_resume_on_another_world_size_skips_nothing() -> None:
    n, old_world, new_world, batch, start = 60, 4, 3, 2, 3  # 3 steps of 8 on 4 ranks
    consumed = set()
    for rank in range(old_world):
        s = ResumableSampler(n, shuffle=True, seed=1, rank=rank, world_size=old_world,
                             batch_size=batch)
        s.set_epoch(2)
        consumed |= set(s.indices()[: start * batch].tolist())
    rest = []
    for rank in range(new_world):
        s = ResumableSampler(n, shuffle=True, seed=1, rank=rank, world_size=new_world,
                             batch_size=batch)
        s.set_epoch(2, consumed=start * batch * old_world)
        rest += list(s)
    # The 36 left, each once: 6 steps of 6 on 3 ranks.
    assert len(consumed) == 24 and len(rest) == len(set(rest)) == 36
    assert consumed | set(rest) == set(range(n))


# --- loader -------------------------------------------------------------------------------------


def test_data_layers_import_downwards() -> None:
    # Each module of pipeline/data imports (at the top or inside a function) only modules of
    # lower layers: no cycles, back ends independent of each other, tools on top.
    import ast

    layers = {"index": 0, "sampler": 0, "listing": 1, "badimages": 1, "shards": 1, "loader": 2,
              "shard_reader": 2, "pil": 3, "dali": 3, "synthetic": 3, "factory": 4,
              "__init__": 5, "verify": 6, "prepare": 6, "shard_writer": 7, "bench": 6}
    folder = Path(__file__).parent.parent / "pipeline" / "data"
    assert {p.stem for p in folder.glob("*.py")} == set(layers)
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                if name.startswith("pipeline.data.") or name == "pipeline.data":
                    imported = name.removeprefix("pipeline.data").lstrip(".") or "__init__"
                    assert layers[imported] < layers[path.stem], f"{path.name} imports {name}"


def test_train_loader_shapes_and_epoch(image_folder: Path) -> None:
    loader = build_loader(small_cfg(image_folder, batch_size=5), "train", train=True)

    assert isinstance(loader, PilLoader)
    assert loader.classes == ["ant", "bee", "cat"]
    assert loader.num_samples == 36
    assert len(loader) == 7  # drop_last: 36 // 5
    batches = list(loader)
    assert len(batches) == 7
    for images, labels in batches:
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (5,) and labels.dtype == torch.int64
    labels = torch.cat([y for _, y in batches]).tolist()
    assert set(labels) == {0, 1, 2}
    assert labels != sorted(labels)  # shuffled
    assert loader.seen == 35 and loader.bad_files == []


def test_val_loader_keeps_the_last_partial_batch(image_folder: Path) -> None:
    loader = build_loader(small_cfg(image_folder, batch_size=5), "val", train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert torch.cat([y for _, y in batches]).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_transforms_give_image_size(image_folder: Path) -> None:
    cfg = small_cfg(image_folder, augment="imagenet", image_size=24, batch_size=4)
    images, _ = next(iter(build_loader(cfg, "train", train=True)))
    assert images.shape == (4, 3, 24, 24)
    images, _ = next(iter(build_loader(cfg, "val", train=False)))
    assert images.shape == (4, 3, 24, 24)


def test_normalisation_and_grayscale_become_three_channels(tmp_path: Path) -> None:
    # PNG is lossless, so the expected values are exact; "L" images must come out as RGB.
    for split in ("train", "val"):
        for c, colour in (("a", (255, 0, 128)), ("b", (10, 200, 30))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), colour).save(tmp_path / split / c / f"{i}.png")
        Image.new("L", (16, 16), 77).save(tmp_path / split / "a" / "gray.png")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    cfg = small_cfg(tmp_path, image_size=16, batch_size=8, mean=mean, std=std)
    images, labels = next(iter(build_loader(cfg, "val", train=False)))

    assert images.shape == (5, 3, 16, 16)
    expected = {
        "a/0.png": (255, 0, 128), "a/1.png": (255, 0, 128), "a/gray.png": (77, 77, 77),
        "b/0.png": (10, 200, 30), "b/1.png": (10, 200, 30),
    }  # fmt: skip
    for image, colour in zip(images, expected.values(), strict=True):
        want = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(image, want[:, None, None].expand(3, 16, 16))
    assert labels.tolist() == [0, 0, 0, 1, 1]


def test_loader_resume_mid_epoch_yields_the_rest(image_folder: Path) -> None:
    cfg = small_cfg(image_folder, batch_size=3)
    first = build_loader(cfg, "train", train=True, seed=5)
    first.set_epoch(2)
    whole = [y for _, y in first]
    assert len(whole) == 12

    interrupted = build_loader(cfg, "train", train=True, seed=5)
    interrupted.set_epoch(2)
    it = iter(interrupted)
    taken = [next(it)[1] for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "consumed": 12, "num_samples": 36}  # 4 batches of 3

    resumed = build_loader(cfg, "train", train=True, seed=5)
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert len(rest) == 8
    assert torch.equal(torch.cat(taken + rest), torch.cat(whole))
    other_epoch = build_loader(cfg, "train", train=True, seed=5)
    other_epoch.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in other_epoch]), torch.cat(whole))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_augmentation_is_identical(image_folder: Path, workers: int) -> None:
    # Random crops and flips, not just the sample order, must repeat after a mid-epoch resume,
    # whatever the worker count of either run.
    cfg = small_cfg(image_folder, augment="imagenet", image_size=24, batch_size=4,
                    workers=workers)
    whole = build_loader(cfg, "train", train=True, seed=1)
    whole.set_epoch(1)
    images = [x for x, _ in whole]
    resumed = build_loader(DataConfig(**{**cfg.__dict__, "workers": 2 - workers}), "train",
                           train=True, seed=1)
    resumed.load_state_dict({"epoch": 1, "consumed": 3 * 4, "num_samples": 36})
    torch.testing.assert_close(torch.cat([x for x, _ in resumed]), torch.cat(images[3:]),
                               rtol=0, atol=0)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    list(whole)  # iterating must not consume the caller's RNG
    assert torch.equal(torch.rand(3), before)


def test_small_augmentation_keeps_grayscale_exact_and_flips_half(tmp_path: Path) -> None:
    # Grayscale ramps, dark on the left: a flip reverses the ramp. PNG, so pixels are exact.
    ramp = np.tile(np.arange(0, 160, 10, dtype=np.uint8), (16, 1))
    for i in range(64):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ramp + i).save(folder / f"{i:02d}.png")
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    cfg = small_cfg(tmp_path, image_size=16, batch_size=64, mean=(0, 0, 0), std=(1, 1, 1))
    for train, epochs in ((True, 3), (False, 1)):
        loader = build_loader(cfg, "train" if train else "val", train=train, seed=0)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            [(images, _)] = list(loader)
            pixels = (images * 255).round()
            assert all(torch.equal(pixels[:, 0], pixels[:, c]) for c in (1, 2))
            assert torch.equal(pixels[:, 0].amin(dim=(1, 2)) + torch.tensor(ramp[0, -1]),
                               pixels[:, 0].amax(dim=(1, 2)))  # exact values, no resampling
            flipped = int((pixels[:, 0, :, 0] > pixels[:, 0, :, -1]).all(dim=1).sum())
            if train:  # a fair coin per image (binomial(64, 1/2): 16..48 is > 99.99%)
                assert 16 <= flipped <= 48, flipped
            else:
                assert flipped == 0


def test_loader_shards_across_ranks(image_folder: Path) -> None:
    cfg = small_cfg(image_folder, batch_size=2)
    per_rank = [
        torch.cat([y for _, y in build_loader(cfg, "val", train=False, rank=r, world_size=2)])
        for r in range(2)
    ]
    assert [len(y) for y in per_rank] == [6, 6]
    assert sorted(torch.cat(per_rank).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_too_few_images_for_a_batch(image_folder: Path) -> None:
    with pytest.raises(UserError, match=r"36 images, fewer than one global batch \(64 per forward "
                                        r"pass x 1 process\(es\) x 1 pass\(es\) = 64\); use "
                                        r"fewer processes or a smaller batch"):
        build_loader(small_cfg(image_folder, batch_size=64), "train", train=True)


def test_bad_config_value_is_named(image_folder: Path) -> None:
    # DataConfig refuses it when built (its __post_init__), before any loader exists.
    with pytest.raises(UserError, match=r"data\.max_bad_fraction=2\.0 must be a finite number"):
        build_loader(small_cfg(image_folder, max_bad_fraction=2.0), "train", train=True)


def add_bad_files(root: Path) -> list[Path]:
    """A JPEG cut in half and a text file named .JPEG, in the train split."""
    truncated = root / "train" / "bee" / "bee_truncated.JPEG"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(truncated, quality=90)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = root / "train" / "cat" / "cat_garbage.JPEG"
    garbage.write_bytes(b"this is not a JPEG at all\n" * 10)
    return [truncated, garbage]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_logged(
    image_folder: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    bad = add_bad_files(image_folder)
    cfg = small_cfg(image_folder, batch_size=38, workers=workers, max_bad_fraction=0.1)
    loader = build_loader(cfg, "train", train=True)  # 38 files: one batch holds them all

    with caplog.at_level(logging.WARNING, logger="pipeline.data.badimages"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == 1
            images, labels = batches[0]
            assert images.shape == (36, 3, 32, 32) and len(labels) == 36

    assert sorted(loader.bad_files) == sorted(str(p) for p in bad)
    assert loader.seen == 76
    for path in bad:  # named once, although met in both epochs
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1


def test_too_many_bad_files_raise(image_folder: Path) -> None:
    bad = add_bad_files(image_folder)
    cfg = small_cfg(image_folder, batch_size=2, max_bad_fraction=0.01)
    loader = build_loader(cfg, "train", train=True)
    good = 0
    with pytest.raises(UserError) as e:
        for _, labels in loader:
            good += len(labels)
    message = str(e.value)
    assert "failed to decode" in message and "data.max_bad_fraction=0.01" in message
    assert "data verify" in message and "or raise data.max_bad_fraction" in message
    assert any(str(p) in message for p in bad)
    # 38 images, one epoch of 19 batches: the check waits for the whole epoch's 38, and the
    # last batch is not handed out
    assert loader.seen == 38 and 34 <= good < 36
    assert message.startswith("2 of 38 images (5.3%)")


@pytest.mark.parametrize("min_seen", [1, 10, 30])
def test_bad_check_waits_for_enough_images(image_folder: Path, monkeypatch, min_seen: int) -> None:
    bad = {str(p) for p in add_bad_files(image_folder)}
    monkeypatch.setattr(badimages, "MIN_SEEN_FOR_BAD_CHECK", min_seen)
    cfg = small_cfg(image_folder, batch_size=2, max_bad_fraction=0.05)
    loader = build_loader(cfg, "train", train=True)
    # Where the policy says it must fail, from the sampler's order: after the first batch with
    # at least min_seen images seen and more than 5% of them bad.
    order = [str(loader.dataset.index.path(i)) for i in loader.sampler.indices()]
    expected = next(
        seen
        for seen in range(2, 39, 2)
        if seen >= min_seen and 0 < len(bad & set(order[:seen])) > 0.05 * seen
    )
    with pytest.raises(UserError):
        for _ in loader:
            pass
    assert loader.seen == expected


# --- resuming on another number of ranks --------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "synthetic"])
@pytest.mark.parametrize("old,new,steps", [((2, 3), (1, 3), 2), ((1, 3), (2, 3), 4),
                                           ((2, 3), (3, 2), 2)])
def test_resume_on_another_world_size_consumes_every_sample_once(
    image_folder: Path, backend: str, old: tuple[int, int], new: tuple[int, int], steps: int,
) -> None:
    workers = 1 if (backend, old) == ("torch", (1, 3)) else 0  # real DataLoader workers, once

    def build(rank: int, world: int, batch: int):
        cfg = small_cfg(image_folder, backend=backend, batch_size=batch, workers=workers)
        return build_loader(cfg, "train", train=True, rank=rank, world_size=world, seed=3)

    before, after, state = consume_across_resize(build, old, new, steps)
    assert state == {"epoch": 1, "consumed": 12, "num_samples": 36}
    assert sorted(i for i, _ in before + after) == list(range(36))  # 12 + 24: no partial batch
    if backend == "torch":  # each label is the one of the image the loader says it loaded
        assert all(label == i // 12 for i, label in before + after)


def test_resume_on_another_world_size_leaves_out_only_a_partial_global_batch(
    image_folder: Path,
) -> None:
    def build(rank: int, world: int, batch: int):
        return build_loader(small_cfg(image_folder, batch_size=batch), "train", train=True,
                            rank=rank, world_size=world, seed=3)

    # 10 consumed by 2 ranks x 5; the 26 left go to 3 ranks x 4: 2 whole steps (24 images).
    before, after, _ = consume_across_resize(build, (2, 5), (3, 4), 1)
    seen = [i for i, _ in before + after]
    # Nothing twice; the 2 images of a partial global batch are left to the next epoch's shuffle,
    # as an uninterrupted epoch leaves its last partial one.
    assert len(seen) == len(set(seen)) == 34


def test_position_from_step_for_checkpoints_without_loader_state(image_folder: Path) -> None:
    from pipeline.data import position_from_step

    # An old 2-rank run with 3 images per rank: 6 steps per epoch of 36 images.
    state = position_from_step(8, epoch=1, num_samples=36, batch_size=3, world_size=2)
    assert state == {"epoch": 1, "consumed": 12, "num_samples": 36}
    loader = build_loader(small_cfg(image_folder, batch_size=4), "train", train=True, seed=3)
    loader.load_state_dict(state)
    assert loader.batches_left == 6  # the 24 images left, 4 at a time on one rank
    # At an epoch's end (saved after its validation: epoch already counted), and with
    # train.max_steps_per_epoch=4 cutting the old run's epochs short.
    assert position_from_step(12, epoch=2, num_samples=36, batch_size=3, world_size=2) == \
        {"epoch": 2, "consumed": 0, "num_samples": 36}
    assert position_from_step(9, epoch=2, num_samples=36, batch_size=3, world_size=2,
                              max_steps_per_epoch=4)["consumed"] == 6


def test_steps_group_passes_and_replace_a_pass_that_failed_whole(image_folder: Path) -> None:
    bad = add_bad_files(image_folder)  # 38 files, 2 of them bad
    cfg = small_cfg(image_folder, batch_size=1, max_bad_fraction=0.2)
    loader = build_loader(cfg, "train", train=True, seed=0, accumulation=2)
    assert (loader.global_batch, loader.steps_per_epoch) == (2, 19)
    steps = list(loader.steps())
    # Every step on every rank, each with both passes: a rank skipping a step would leave the
    # others waiting in DDP's all-reduce.
    assert len(steps) == 19 and all(len(step) == 2 for step in steps)
    passes = [p for step in steps for p in step]
    repeated = [i for i in range(1, len(passes)) if passes[i] is passes[i - 1]]
    assert len(repeated) == 2 and sorted(loader.bad_files) == sorted(map(str, bad))
    assert all(len(labels) == 1 for _, labels in passes)


def test_index_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    # benchmarks/bench_index.py's measurement, in this process, on 3 x 4 files.
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "bench_index.py"
    spec = importlib.util.spec_from_file_location("bench_index", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tree = bench.write_tree(tmp_path / "3x4", classes=3, per_class=4)
    result = bench.measure("compact", tree, workers=1)
    assert result["entries"] == 12 and len(result["worker_growth_mb"]) == 1
    compact, old = index_split(tree, "train"), bench.ListIndex(tree, "train")
    assert [compact.path(i) for i in range(12)] == [old.path(i) for i in range(12)]
