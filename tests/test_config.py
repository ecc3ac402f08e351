import subprocess
import sys

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.errors import UserError

DEMO = "configs/demo_fmnist_resnet_ann.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["train.epochs=3", "loss.scheme=linear", "data.crop_scale=[0.2,1]",
                             "model.kwargs={width: 8}", "optim.lr=1"])
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 3
    assert cfg.loss.scheme == "linear"
    assert cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.model.kwargs == {"width": 8}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.image_size == 28  # from the file, untouched by the overrides


def test_defaults_without_file():
    cfg = load_config(None, ["name=x"])
    assert cfg.name == "x" and cfg.train.epochs == Config().train.epochs


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], ["train.epoch", "train.epochs"]),
    (["trian.epochs=3"], ["trian", "train"]),
    (["train.epochs=three"], ["train.epochs", "int"]),
    (["train.amp=fp8"], ["train.amp", "bf16"]),
    (["data.crop_scale=[1,2,3]"], ["data.crop_scale", "2 items"]),
    (["train.epochs"], ["section.key=value"]),
])
def test_bad_overrides_name_the_key_and_the_fix(override, words):
    with pytest.raises(UserError) as err:
        load_config(DEMO, override)
    for word in words:
        assert word in str(err.value)


def test_bad_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epohcs: 2\n")
    with pytest.raises(UserError, match="epohcs.*train.epochs"):
        load_config(path)


def test_missing_file_suggests_nearby_config():
    with pytest.raises(UserError, match="does not exist.*demo_fmnist_resnet_ann.yaml"):
        load_config("configs/demo_fmnist_resnet.yaml")


def test_cli_bad_key_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", DEMO,
                           "train.epoch=1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "train.epochs" in proc.stderr


@pytest.mark.parametrize("overrides, expect", [
    # (epoch, lr) pairs; steps_per_epoch = 10, base lr 0.1 x batch 256 / 256. timm's warmup
    # runs inside the cosine (its default), so the cosine is at half height at epoch 2 of 4.
    (["schedule.name=step", "schedule.decay_epochs=[2,4]", "train.epochs=6"],
     [(0, 0.1), (1.5, 0.1), (2.5, 0.01), (3.5, 0.01), (4.5, 0.001)]),
    (["schedule.name=cosine", "train.epochs=4", "schedule.warmup_epochs=1",
      "schedule.warmup_lr=0.0"], [(0, 0.0), (0.5, 0.05), (2, 0.05), (4, 0.0)]),
])
def test_schedules(overrides, expect):
    from pipeline.train.trainer import build_scheduler

    cfg = load_config(None, ["optim.lr=0.1", "data.batch_size=256", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10)
    for epoch, lr in expect:
        scheduler.step_update(round(epoch * 10))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-3), (epoch, lr)
