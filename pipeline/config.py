"""The typed run config: YAML file + dotted command-line overrides, validated with clear errors.

    cfg = load_config("configs/demo_fmnist_resnet_ann.yaml", ["train.epochs=3", "optim.lr=0.1"])

Every section is a dataclass; a YAML key or override that names no field, or a value of the wrong
type, raises `UserError` naming the key and the nearest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


@dataclass
class DataConfig:
    root: str = "data/fashion-mnist"  # ImageNet layout: root/{train,val}/<class>/<image>.JPEG
    # torch: PIL + DataLoader; dali: NVIDIA DALI (GPU decode when a GPU is visible, else CPU
    # operators); synthetic: random tensors on the device, for throughput measurements.
    backend: Literal["torch", "dali", "synthetic"] = "torch"
    image_size: int = 224
    # "imagenet": RandomResizedCrop + flip / resize + centre crop; "small": flip only, for
    # images already at image_size (CIFAR, Fashion-MNIST).
    augment: Literal["imagenet", "small"] = "imagenet"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_resize_ratio: float = 0.875  # centre crop = image_size, resize = image_size / ratio
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 256  # per process
    workers: int = 4
    # A training run fails once more than this fraction of the images it met would not decode.
    max_bad_fraction: float = 0.01
    # Folder with `python -m pipeline data verify`'s lists (<split>.txt, <split>.bad.txt); the
    # loaders leave out the images listed as bad. "" = the data root.
    file_lists: str = ""
    # DALI and synthetic batches: dtype and memory layout (channels_last = NHWC in memory, what
    # train.channels_last wants, so the trainer's conversion is free). float16 halves the host to
    # GPU copy; use it with train.amp=fp16 or bf16.
    dtype: Literal["float32", "float16"] = "float32"
    channels_last: bool = False
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: gpu when CUDA is available
    endpoint_url: str = ""  # for an s3:// data.root on an S3-compatible server; "" = AWS


@dataclass
class ModelConfig:
    name: str = "resnet_ann_cifar20"  # any name registered with timm by pipeline.models
    num_classes: int = 0  # 0: the number of class folders in the data set
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class LossConfig:
    scheme: str = "sieve"  # const, linear, half_end, opt, sieve, sieve_orig, adaloss
    opt_exit: int = 0  # for scheme=opt: 1-based exit; 0 = the final exit
    alternating: bool = False  # the seed's AANN: add one exit's loss drawn from the weights
    adaloss_update_every: int = 100
    adaloss_momentum: float = 0.9
    adaloss_gamma: float = 0.07
    adaloss_final_boost: float = 0.0


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name: sgd (nesterov), momentum, adamw, ...
    lr: float = 0.1  # for the reference batch of 256; scaled by global batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-4
    min_lr: float = 0.0
    decay_epochs: list[int] = field(default_factory=lambda: [30, 60, 90])  # for name=step
    decay_rate: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 90
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    log_every: int = 50  # steps between progress lines
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; small values for smoke tests


@dataclass
class CheckpointConfig:
    url: str = ""  # fsspec URL or path (s3://bucket/prefix, gs://..., file://...); "" = run folder
    endpoint_url: str = ""  # an S3-compatible server (MinIO, Ceph, ...); "" = AWS
    every_steps: int = 0  # also save every N steps within an epoch; 0 = at epoch ends only
    async_save: bool = True  # write in a background thread; preemption saves are always blocking
    keep_last: int = 3
    keep_every_epochs: int = 0  # also keep every N-th epoch's checkpoint; 0 = none
    retries: int = 4  # per storage call, with exponential backoff from retry_delay seconds
    retry_delay: float = 1.0
    max_failed_saves: int = 3  # stop the run after this many failed saves in a row


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    # "never": refuse a run folder that holds a run already; "auto": continue from its newest
    # checkpoint (or start fresh when it has none).
    resume: Literal["never", "auto"] = "never"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(self.run_dir / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            near = _near(path.name, [p.name for p in Path("configs").glob("*.yaml")])
            raise UserError(f"config file {path} does not exist{near}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from e
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {raw!r:.60}")
    return config_from_dict(with_overrides(raw, overrides))


def with_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` (a config as nested dicts) with `a.b=value` overrides applied, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else "")
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, prefix="")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted!r}: {part!r} is a value, not a section")
        tree = node
    tree[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".") or "config"
        raise UserError(f"{section} must be a section (a mapping), got {raw!r:.60}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(
                f"unknown config key {prefix}{key!r}{_near(str(key), names, prefix)}"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the field type `hint`; convert only where it loses nothing."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            names = [str(a) for a in args]
            raise UserError(f"{key}={value!r} is not one of {', '.join(names)}"
                            f"{_near(str(value), names)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(arg, value, key)
            except UserError:
                continue
        raise UserError(f"{key}={value!r} has the wrong type; expected {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{key} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, e.g. {key}={{a: 1}}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # names like "50" typed bare on the command line
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise UserError(f"{key}={value!r} must be of type {hint.__name__}")
    return value


def _near(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    return "; valid names: " + ", ".join(f"{prefix}{c}" for c in choices) if choices else ""


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict is YAML-safe and JSON-safe."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
