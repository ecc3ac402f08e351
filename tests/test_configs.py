"""Every shipped config loads, names a registered anytime model, and follows its recipe."""

from functools import cache
from pathlib import Path

import pytest
import timm
import torch

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.anytime.weights import static_weights
from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
ILSVRC = [p for p in CONFIGS if p.name.startswith("ilsvrc_")]


@cache
def build(name: str, num_classes: int, kwargs: tuple) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, **dict(kwargs)).eval()


def test_the_launchers_configs_exist():
    names = {p.stem for p in ILSVRC}
    expected = {f"ilsvrc_msdnet{d}_sieve" for d in (26, 36, 41)} | {
        "ilsvrc_msdnet26_const", "ilsvrc_resnet50_opt"} | {
        f"ilsvrc_resnet{d}_{s}" for d in (50, 101) for s in ("sieve", "const")}
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    assert timm.is_model(cfg.model.name), f"{path.name}: {cfg.model.name} is not registered"
    num_classes = cfg.model.num_classes or 10
    model = build(cfg.model.name, num_classes, tuple(sorted(cfg.model.kwargs.items())))
    size = min(cfg.data.image_size, 64)  # a tiny input: this checks wiring, not accuracy
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert len(out) == model.num_exits and out[-1].shape == (1, num_classes)
    weights = static_weights(cfg.loss.scheme, model.num_exits, cfg.loss.opt_exit)
    assert len(weights) == model.num_exits


@pytest.mark.parametrize("path", ILSVRC, ids=[p.stem for p in ILSVRC])
def test_ilsvrc_recipe(path):
    cfg = load_config(path)
    msdnet = cfg.model.name.startswith("msdnet")
    assert cfg.name == path.stem  # run folders and checkpoints of two configs never collide
    assert cfg.loss.scheme == path.stem.rsplit("_", 1)[1]
    assert (cfg.data.augment, cfg.data.image_size, cfg.data.crop_scale) == (
        "imagenet", 224, (0.08, 1.0))
    assert cfg.model.num_classes == 1000
    # Nesterov ("sgd") for MSDNet as its paper trains it; plain momentum for the ResNets.
    assert cfg.optim.name == ("sgd" if msdnet else "momentum")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert cfg.schedule.name == "step" and cfg.schedule.decay_rate == 0.1
    assert cfg.schedule.decay_epochs == ([30, 60] if msdnet else [30, 60, 90])
    assert cfg.train.epochs == 90
    assert (cfg.train.amp, cfg.train.channels_last) == ("bf16", True)
    # The reference batch of 256 on any number of GPUs: 4 x 64, 8 x 32, 2 x 64 x 2 passes.
    assert cfg.train.global_batch == 256
    assert [cfg.batch_geometry(gpus) for gpus in (1, 2, 4, 8)] == [(64, 4), (64, 2), (64, 1),
                                                                   (32, 1)]
