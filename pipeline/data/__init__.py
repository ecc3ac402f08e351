"""One loader interface over several back ends; `build_loader` picks one from `data.backend`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from pipeline.config import DataConfig
from pipeline.data.folder import compare_classes, index_split, list_classes
from pipeline.data.remote import build_url_loader, is_url
from pipeline.data.verify import apply_file_lists
from pipeline.errors import UserError


class Loader(Protocol):
    """What every back end gives the trainer: (images N x 3 x H x W, int64 labels) batches."""

    classes: list[str]
    num_samples: int
    batch_size: int
    bad_files: list[str]  # images that failed to decode during this run, by path

    def __len__(self) -> int: ...  # batches per epoch on this rank
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


def build_loader(
    cfg: DataConfig,
    split: str,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Loader:
    """The loader of root/split for one rank: batches of (NCHW images, int64 labels); float32
    unless data.dtype says otherwise, on the GPU for DALI's 'mixed' decode."""
    if cfg.backend == "synthetic":
        from pipeline.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, split, train=train, rank=rank, world_size=world_size)
    if is_url(cfg.root):
        return build_url_loader(cfg, split, train=train, rank=rank, world_size=world_size,
                                seed=seed)
    index = index_split(cfg.root, split)
    train_dir = index.root / "train"
    if split != "train" and train_dir.is_dir():
        # Labels are positions in the sorted class list: a split with other class folders than
        # train would be scored against the wrong labels without any error.
        train_classes = list_classes(index.root, "train")
        compare_classes(train_classes, index.classes, train_dir, index.split_dir)
    index = apply_file_lists(index, cfg.file_lists)  # leaves out what `data verify` found bad
    if cfg.backend == "torch":
        from pipeline.data.torch import TorchLoader

        if cfg.dtype != "float32" or cfg.channels_last:
            raise UserError("data.dtype and data.channels_last apply to data.backend=dali or "
                            "synthetic; leave them at float32 / false for data.backend=torch")
        return TorchLoader(cfg, index, train=train, rank=rank, world_size=world_size, seed=seed)
    if cfg.backend == "dali":
        from pipeline.data.dali import DaliLoader

        return DaliLoader(cfg, index, train=train, rank=rank, world_size=world_size, seed=seed)
    raise UserError(f"data.backend={cfg.backend!r} is not available; use data.backend=torch, "
                    "dali or synthetic")
