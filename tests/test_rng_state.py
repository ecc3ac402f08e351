"""Random-number-generator state: captured, saved as a checkpoint would, restored per rank."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.train.state import capture_rng_all_ranks, restore_rng_of_rank, seed_everything


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_restored_states_continue_each_generator(tmp_path):
    seed_everything(7)
    saved = capture_rng_all_ranks()  # one process: [this rank's states]
    expected = draws()
    torch.save({"rng": saved}, tmp_path / "state.pt")
    seed_everything(123)
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["rng"]
    assert restore_rng_of_rank(loaded, 0)
    assert draws() == expected


def test_a_checkpoint_without_states_for_a_rank_leaves_its_seed():
    seed_everything(7)
    old_format = capture_rng_all_ranks()[0]  # checkpoints before per-rank states: one dict
    seed_everything(3)
    expected = draws()
    seed_everything(3)
    assert not restore_rng_of_rank(old_format, 1)
    assert draws() == expected
    assert restore_rng_of_rank(old_format, 0)
