"""`build_loader`: the one way to get a loader, for any back end and any data root (an image
folder on local disk or in object storage, or the manifest of tar shards anywhere)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.badimages import apply_file_lists
from pipeline.data.index import SampleIndex
from pipeline.data.listing import compare_classes, index_split, list_split_classes
from pipeline.data.loader import Loader
from pipeline.data.shards import load_shard_index
from pipeline.errors import UserError
from pipeline.storage.urls import is_manifest, is_remote

# data.backend -> the module and class of its Loader, imported when used (torchvision's and
# DALI's imports take seconds that the other back ends need not pay).
BACKENDS = {
    "torch": ("pipeline.data.pil", "PilLoader"),
    "dali": ("pipeline.data.dali", "DaliLoader"),
    "synthetic": ("pipeline.data.synthetic", "SyntheticLoader"),
}


def build_loader(cfg: DataConfig, split: str, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, accumulation: int = 1) -> Loader:
    """The loader of root/split for one rank: batches of (NCHW images, int64 labels) of
    data.batch_size; float32 unless data.dtype says otherwise, on the GPU for DALI's 'mixed'
    decode. `accumulation`: forward passes per optimizer step (training: `loader.steps()`)."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"data.backend={cfg.backend!r} is not available; use data.backend="
                        f"{', '.join(list(BACKENDS)[:-1])} or {list(BACKENDS)[-1]}")
    module, name = BACKENDS[cfg.backend]
    loader_class: type[Loader] = getattr(importlib.import_module(module), name)
    if cfg.backend == "synthetic" and (is_remote(cfg.root) or not Path(cfg.root).is_dir()):
        return loader_class(cfg, split, train=train, rank=rank, world_size=world_size, seed=seed,
                            accumulation=accumulation)
    if is_manifest(cfg.root):  # every back end reads shards, local or in object storage
        shards = load_shard_index(cfg.root, split, cfg.endpoint_url)
        loader = loader_class(cfg, shards, train=train, rank=rank, world_size=world_size,
                              seed=seed, accumulation=accumulation)
        loader.identity = shards.identity()
        return loader
    # an image folder: on this machine, or in object storage for DALI only (DataConfig checks)
    index = index_split(cfg.root, split, cfg.endpoint_url)
    check_classes_match_train(cfg, index)
    identity = index.identity()
    index = apply_file_lists(index, cfg.file_lists)  # leaves out what `data verify` found bad
    loader = loader_class(cfg, index, train=train, rank=rank, world_size=world_size, seed=seed,
                          accumulation=accumulation)
    loader.identity = identity
    return loader


def check_classes_match_train(cfg: DataConfig, index: SampleIndex) -> None:
    """Labels are positions in the sorted class list: a split with other class folders than
    train would be scored against the wrong labels without any error."""
    if index.split == "train":
        return
    train_dir = f"{str(index.root).rstrip('/')}/train"
    if not index.is_remote and not Path(train_dir).is_dir():
        return  # a folder with only a validation split, for evaluating a checkpoint
    train_classes = list_split_classes(index.root, "train", cfg.endpoint_url)
    compare_classes(train_classes, index.classes, train_dir if index.is_remote else
                    Path(train_dir), index.split_dir)
