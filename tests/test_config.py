import signal
import subprocess
import sys

import pytest
import torch
from conftest import in_process

from pipeline.config import (
    RESUME_MAY_CHANGE,
    Config,
    DataConfig,
    TrainConfig,
    classify_resume_changes,
    load_config,
)
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
    (["data.allow_sample_change=maybe"], ["data.allow_sample_change", "bool"]),
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
    scheduler = build_scheduler(cfg.schedule, cfg.train.epochs, optimizer, steps_per_epoch=10)
    for epoch, lr in expect:
        scheduler.step_update(round(epoch * 10))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-3), (epoch, lr)


# --- value checks: each section's __post_init__ ---------------------------------------------------

BAD_VALUES = [
    "optim.lr=-0.1", "optim.lr=0", "optim.momentum=1", "optim.momentum=-0.5",
    "optim.weight_decay=-0.0001", "optim.grad_clip=-1", "optim.name=sgdd", "optim.name=foo_sgd",
    "train.epochs=0", "train.max_steps_per_epoch=-5", "train.log_every=0",
    "checkpoint.every_steps=-1", "checkpoint.keep_last=-1", "checkpoint.keep_every_epochs=-2",
    "checkpoint.retries=-1", "checkpoint.retry_delay=-1", "checkpoint.max_failed_saves=0",
    "checkpoint.lease_ttl=0", "checkpoint.lease_ttl=-5", "checkpoint.endpoint_url=localhost:9000",
    "data.batch_size=0", "data.image_size=-1", "data.workers=-1", "data.max_bad_fraction=1.5",
    "data.val_resize_ratio=0", "data.val_resize_ratio=1.2", "data.crop_scale=[0.5,0.2]",
    "data.crop_scale=[0,1]", "data.crop_scale=[0.5,1.5]", "data.crop_ratio=[1.3,0.7]",
    "data.crop_ratio=[0,1]", "data.std=[0.2,0,0.2]", "data.root=", "data.dtype=float16",
    "data.channels_last=true",
    "model.num_classes=-1", "model.name=", "model.kwargs={1: 2}",
    "loss.scheme=siev", "loss.opt_exit=-1", "loss.adaloss_update_every=0",
    "loss.adaloss_momentum=1", "loss.adaloss_gamma=2", "loss.adaloss_final_boost=-1",
    "loss.sum_rand_ratio=0", "loss.alternating_rule=author",
    "schedule.warmup_epochs=-1", "schedule.warmup_lr=-1", "schedule.min_lr=-0.1",
    "schedule.decay_epochs=[60,30]", "schedule.decay_epochs=[30,30]", "schedule.decay_epochs=[-1]",
    "schedule.decay_rate=0", "schedule.decay_rate=1.5",
    "name=", "name=a/b", "name=..", "out_dir=", "seed=-1",
]
NON_FINITE = [f"{key}={v}" for key in (
    "optim.lr", "optim.momentum", "optim.weight_decay", "optim.grad_clip", "data.max_bad_fraction",
    "data.val_resize_ratio", "schedule.warmup_epochs", "schedule.min_lr", "schedule.decay_rate",
    "checkpoint.retry_delay", "checkpoint.lease_ttl", "loss.adaloss_gamma", "loss.sum_rand_ratio",
) for v in ("nan", ".nan", "inf", "-.inf")] + [
    "data.crop_scale=[.nan,1]", "data.std=[0.2,.inf,0.2]", "data.mean=[.nan,0,0]"]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_value_is_refused_in_one_line_naming_the_key(override):
    message = refusal(override)
    assert message.startswith(override.partition("=")[0] + "="), message


@pytest.mark.parametrize("override", NON_FINITE)
def test_nan_and_inf_are_refused(override):
    # Bare nan/inf are strings to YAML 1.1 (.nan/.inf are floats): both read as the float and
    # are refused for not being finite, not for their type.
    message = refusal(override)
    assert message.startswith(override.partition("=")[0] + "="), message
    assert "must be" in message and "finite" in message, message


def refusal(override: str) -> str:
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, words", [
    ("optim.lr=-0.1", ["optim.lr=-0.1 must be a finite number > 0", "e.g. optim.lr=0.1"]),
    ("optim.lr=nan", ["optim.lr=nan must be a finite number > 0"]),
    ("optim.momentum=1", ["in [0, 1)"]),
    ("optim.name=sgdd", ["not a timm optimizer", "did you mean sgd"]),
    ("loss.scheme=siev", ["did you mean sieve", "half_end"]),
    ("checkpoint.keep_last=-1", [">= 0 (0 = keep all)"]),
    ("loss.alternating_rule=author", ["seed", "authors"]),
    ("data.channels_last=true", ["data.backend=torch", "set train.channels_last=true instead"]),
    ("data.root=s3://b/imagenet", ["only data.backend=dali reads", "prepare shards s3://b/imagenet "
                                   "--out s3://b/imagenet-shards;", "s3://b/imagenet-shards/"
                                   "shards.json"]),
])
def test_value_messages_give_the_range_and_the_fix(override, words):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("override", [
    "optim.name=lookahead_sgd", "optim.name=AdamW", "optim.name=momentum", "optim.lr=1e-4",
    "checkpoint.keep_last=0", "checkpoint.lease_ttl=0.5", "schedule.decay_epochs=[]",
    "data.backend=synthetic", "data.crop_scale=[1,1]", "optim.momentum=0",
    "data.root=s3://b/imagenet-shards/shards.json", "data.root=file:///data/imagenet",
])
def test_edge_values_are_accepted(override):
    load_config(None, [override, *(["data.root="] if "synthetic" in override else [])])


def test_a_check_across_sections_names_both_keys():
    with pytest.raises(UserError, match=r"^data.dtype=float16 needs mixed precision: set "
                                        r"train.amp=bf16 or fp16, or data.dtype=float32$"):
        load_config(None, ["data.backend=synthetic", "data.dtype=float16", "train.amp=none"])
    load_config(None, ["data.backend=synthetic", "data.dtype=float16", "train.amp=bf16"])


def test_defaults_are_valid_and_checks_run_on_direct_construction():
    cfg = Config()
    assert cfg.checkpoint.lease_ttl == 120.0
    with pytest.raises(UserError, match=r"^train\.epochs=0 "):
        TrainConfig(epochs=0)
    with pytest.raises(UserError, match=r"^data\.backend='ffcv' is not one of"):
        DataConfig(backend="ffcv")


def test_cli_bad_value_is_one_line_exit_2(capsys):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    code, _, err = in_process(capsys, "train", "--config", DEMO, "optim.lr=-0.1")
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: optim.lr=-0.1 must be a finite number > 0")
    # and it leaves no preemption handler behind in this process (a process pool forked later
    # would ignore its own termination: the suite once hung there)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


# --- what a resume may change ---------------------------------------------------------------------


def changes(saved_overrides, new_overrides, edit_saved=None):
    saved = load_config(None, saved_overrides).to_dict()
    if edit_saved:
        edit_saved(saved)
    return classify_resume_changes(saved, load_config(None, new_overrides).to_dict())


def test_same_config_changes_nothing():
    assert changes(["optim.lr=0.2"], ["optim.lr=0.2"]) == ([], [])


@pytest.mark.parametrize("override, line", [
    ("model.name=msdnet_cifar", "model.name: 'resnet_ann_cifar20' -> 'msdnet_cifar'"),
    ("model.num_classes=10", "model.num_classes: 0 -> 10"),
    ("loss.scheme=const", "loss.scheme: 'sieve' -> 'const'"),
    ("loss.alternating=true", "loss.alternating: False -> True"),
    ("optim.name=adamw", "optim.name: 'sgd' -> 'adamw'"),
    ("optim.lr=0.2", "optim.lr: 0.1 -> 0.2"),
    ("optim.grad_clip=1", "optim.grad_clip: 0.0 -> 1.0"),
    ("schedule.decay_epochs=[30,60]", "schedule.decay_epochs: [30, 60, 90] -> [30, 60]"),
    ("data.image_size=192", "data.image_size: 32 -> 192"),
    ("data.crop_scale=[0.2,1]", "data.crop_scale: [0.08, 1.0] -> [0.2, 1.0]"),
    ("data.std=[0.5,0.5,0.5]", "data.std: [0.247, 0.2435, 0.2616] -> [0.5, 0.5, 0.5]"),
    ("seed=1", "seed: 0 -> 1"),
    ("train.amp=bf16", "train.amp: 'none' -> 'bf16'"),
    ("train.max_steps_per_epoch=10", "train.max_steps_per_epoch: 0 -> 10"),
])
def test_resume_refuses_a_different_experiment(override, line):
    assert changes([], [override]) == ([line], [])


@pytest.mark.parametrize("override, line", [
    ("train.epochs=120", "train.epochs: 90 -> 120"),
    ("train.epochs=10", "train.epochs: 90 -> 10"),
    ("train.log_every=5", "train.log_every: 50 -> 5"),
    ("train.device=cpu", "train.device: 'auto' -> 'cpu'"),
    ("train.channels_last=true", "train.channels_last: False -> True"),
    ("data.workers=8", "data.workers: 4 -> 8"),
    # the global batch they make up is the trainer's check (tests/test_elastic_resume.py)
    ("data.batch_size=128", "data.batch_size: 256 -> 128"),
    ("train.global_batch=512", "train.global_batch: 0 -> 512"),
    ("train.allow_batch_change=true", "train.allow_batch_change: False -> True"),
    ("data.backend=dali", "data.backend: 'torch' -> 'dali'"),
    ("data.root=/mnt/copy", "data.root: 'data/fashion-mnist' -> '/mnt/copy'"),
    ("data.file_lists=lists", "data.file_lists: '' -> 'lists'"),
    # the trainer checks the data itself against the checkpoint's (tests/test_data_identity.py)
    ("data.allow_sample_change=true", "data.allow_sample_change: False -> True"),
    ("checkpoint.every_steps=100", "checkpoint.every_steps: 0 -> 100"),
    ("checkpoint.url=s3://b/p", "checkpoint.url: '' -> 's3://b/p'"),
    # a renamed run folder; the trainer refuses it where checkpoint.url is set
    # (tests/test_run_integrity.py)
    ("name=other", "name: 'run' -> 'other'"),
    ("checkpoint.lease_ttl=30", "checkpoint.lease_ttl: 120.0 -> 30.0"),
    ("out_dir=/scratch/runs", "out_dir: 'runs' -> '/scratch/runs'"),
    ("resume=auto", "resume: 'never' -> 'auto'"),
])
def test_resume_accepts_where_and_how_the_run_goes_on(override, line):
    assert changes([], [override]) == ([], [line])


@pytest.mark.parametrize("global_batch, batch, world, expected", [
    (0, 64, 3, (64, 1)),  # no global batch: data.batch_size on each process
    (256, 64, 4, (64, 1)),
    (256, 64, 2, (64, 2)),
    (256, 64, 1, (64, 4)),
    (256, 100, 1, (64, 4)),  # the fewest passes of at most data.batch_size
    (96, 40, 1, (32, 3)),
    (7, 4, 1, (1, 7)),  # a prime global batch: passes of one image
    (16, 64, 2, (8, 1)),  # more room than needed: one pass
])
def test_batch_geometry_splits_the_global_batch(global_batch, batch, world, expected):
    cfg = load_config(DEMO, [f"train.global_batch={global_batch}", f"data.batch_size={batch}"])
    per_pass, passes = cfg.batch_geometry(world)
    assert (per_pass, passes) == expected
    assert per_pass * passes * world == (global_batch or batch * world)


def test_a_global_batch_that_does_not_split_over_the_processes_is_one_line():
    cfg = load_config(DEMO, ["train.global_batch=16"])
    with pytest.raises(UserError, match=r"^train.global_batch=16 does not split evenly over 3 "
                                        r"processes; run on a number of processes that divides "
                                        r"it, or set train.global_batch to a multiple of 3 "
                                        r"\(e.g. 15 or 18; resuming "
                                        r"a run, also train.allow_batch_change=true\)$"):
        cfg.batch_geometry(3)


def test_resume_lists_are_sorted_and_split():
    refused, accepted = changes([], ["train.epochs=100", "optim.lr=0.2", "data.workers=1",
                                     "loss.scheme=linear"])
    assert refused == ["loss.scheme: 'sieve' -> 'linear'", "optim.lr: 0.1 -> 0.2"]
    assert accepted == ["data.workers: 4 -> 1", "train.epochs: 90 -> 100"]


def test_resume_from_an_older_config_uses_defaults_and_ignores_unknown_keys():
    def older(saved):
        del saved["checkpoint"]["lease_ttl"]  # a field this code added
        del saved["loss"]  # a whole section missing
        saved["train"]["retired_option"] = 1  # a field this code dropped
        saved["legacy"] = {"x": 1}

    assert changes([], [], older) == ([], [])
    assert changes([], ["checkpoint.lease_ttl=60"], older) == (
        [], ["checkpoint.lease_ttl: 120.0 -> 60.0"])


def test_resume_compares_model_kwargs_key_by_key():
    refused, accepted = changes(["model.kwargs={depth: 20, width: 8}"],
                                ["model.kwargs={depth: 32, width: 8, drop: 0.1}"])
    assert refused == ["model.kwargs.depth: 20 -> 32", "model.kwargs.drop: (unset) -> 0.1"]
    assert accepted == []


def test_every_accepted_prefix_names_a_config_key():
    keys = set(_flat_keys(Config().to_dict()))
    for prefix in RESUME_MAY_CHANGE:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix


def _flat_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("overrides, start", [
    (["loss.alternating_rule=authors"], "loss.alternating_rule='authors' needs loss.alternating"),
    (["loss.alternating=true", "loss.sum_rand_ratio=4"],
     "loss.sum_rand_ratio=4.0 applies only with loss.alternating_rule=authors"),
])
def test_loss_keys_that_would_do_nothing_are_refused(overrides, start):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(start) and "\n" not in str(err.value), err.value
    cfg = load_config(None, [*overrides, "loss.alternating=true", "loss.alternating_rule=authors"])
    assert (cfg.loss.alternating_rule, cfg.loss.alternating) == ("authors", True)


def test_a_model_name_with_an_unknown_tag_keeps_the_sections_data_values():
    # timm raises RuntimeError for an unknown pretrained tag: the config keeps the section's
    # values, and making the model names the problem in one line (test_cli.py).
    assert load_config(None, ["model.name=resnet50.nope"]).data.image_size == 224


def test_alternating_with_opt_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        load_config(None, ["loss.scheme=opt", "loss.alternating=true"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("loss.alternating=True does not go with loss.scheme=opt"), message
    assert "e.g. loss.alternating=false" in message
    assert load_config(None, ["loss.scheme=opt"]).loss.alternating is False


@pytest.mark.parametrize("model, size, mean, std", [
    # The defaults model (resnet_ann_cifar20) and every CIFAR model: 32x32, CIFAR-10 statistics.
    (None, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)),
    ("msdnet_cifar", 32, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)),
    ("msdnet26", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("resnet50_ann", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("vit_base_patch16_384", 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # any timm model's cfg
    ("not_a_model", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the section's own
])
def test_unset_input_size_and_statistics_come_from_the_model(model, size, mean, std):
    cfg = load_config(None, [f"model.name={model}"] if model else [])
    assert (cfg.data.image_size, cfg.data.mean, cfg.data.std) == (size, mean, std)


def test_every_anytime_model_has_its_data_defaults():
    import timm

    names = timm.list_models("*_ann*") + timm.list_models("*_opt") + timm.list_models("msdnet*")
    assert {"msdnet26", "msdnet_cifar", "resnet50_ann", "resnet_ann_cifar110"} <= set(names)
    cifar = (32, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))
    imagenet = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for name in names:
        data = load_config(None, [f"model.name={name}"]).data
        assert (data.image_size, data.mean, data.std) == (cifar if "cifar" in name else imagenet)


def test_input_size_and_statistics_a_config_sets_win_over_the_model():
    demo = load_config(DEMO)  # a CIFAR model, at 28x28 with Fashion-MNIST statistics
    assert (demo.data.image_size, demo.data.mean) == (28, (0.286, 0.286, 0.286))
    cfg = load_config(None, ["model.name=msdnet26", "data.image_size=288", "data.std=[1,1,1]"])
    assert (cfg.data.image_size, cfg.data.mean, cfg.data.std) == (
        288, (0.485, 0.456, 0.406), (1.0, 1.0, 1.0))
    # A resume that changes the model changes what its data defaults to: both are named.
    refused, _ = changes([], ["model.name=msdnet26"])
    assert "data.image_size: 32 -> 224" in refused and any(
        line.startswith("model.name:") for line in refused)
