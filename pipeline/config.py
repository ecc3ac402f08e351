"""The typed run config: YAML file + dotted command-line overrides, validated with clear errors.

    cfg = load_config("configs/demo_fmnist_resnet_ann.yaml", ["train.epochs=3", "optim.lr=0.1"])

Every section is a dataclass; a YAML key or override that names no field, or a value of the wrong
type, raises `UserError` naming the key and the nearest valid names. Each section's `__post_init__`
checks its values (ranges, finiteness, known names), so building a Config - from a file, a
checkpoint's stored dict or in code - refuses a bad value in one line naming the dotted key, the
allowed range and an example. `classify_resume_changes` tells which changes a resume may accept.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError
from pipeline.storage.urls import is_manifest, is_remote

# The loss-weight schemes (SPEC section 2; pipeline/anytime/weights.py computes them).
SCHEMES = ("const", "linear", "half_end", "opt", "sieve", "sieve_orig", "adaloss")


@dataclass
class DataConfig:
    # ImageNet layout: root/{train,val}/<class>/<image>.JPEG; or the shards.json of tar shards
    # (`python -m pipeline prepare shards`), a path or a URL (s3://bucket/imagenet/shards.json)
    root: str = "data/fashion-mnist"
    # torch: PIL + DataLoader; dali: NVIDIA DALI (GPU decode when a GPU is visible, else CPU
    # operators); synthetic: random tensors on the device, for throughput measurements.
    backend: Literal["torch", "dali", "synthetic"] = "torch"
    # image_size, mean, std: a config that leaves them out gets the model's (its timm pretrained
    # cfg, see load_config): 32 and CIFAR-10's statistics for the CIFAR models. These defaults
    # are ImageNet's, for a Config built in code.
    image_size: int = 224
    # "imagenet": RandomResizedCrop + flip / resize + centre crop; "small": flip only, for
    # images already at image_size (CIFAR, Fashion-MNIST).
    augment: Literal["imagenet", "small"] = "imagenet"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_resize_ratio: float = 0.875  # centre crop = image_size, resize = image_size / ratio
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Images per process per forward pass. With train.global_batch set: the most that fits on
    # one device; the trainer accumulates passes to make up the global batch.
    batch_size: int = 256
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
    # Resume even when the training images differ from those the checkpoint recorded (other
    # counts or file names per class): the epoch goes on at its position in the new order.
    # Without it such a resume is refused. The classes must match either way (labels are
    # positions in the class list).
    allow_sample_change: bool = False
    # Tar shards (data.root = .../shards.json), docs/data.md: consecutive samples of a shard read
    # together, with one request in object storage (a block); blocks shuffled together in a
    # window (the shuffle's reach: window x block samples per stream); blocks fetched ahead of
    # use, and in parallel; the node-local cache of blocks (shared by a node's processes;
    # "" = $TMPDIR or /tmp) and its size for the whole node.
    shard_block: int = 128
    shuffle_window: int = 16
    prefetch: int = 16
    fetch_threads: int = 8
    cache_dir: str = ""
    cache_gb: float = 16.0

    def __post_init__(self) -> None:
        c = _Check(self, "data.")
        if self.backend != "synthetic":  # synthetic batches read nothing
            c.text("root", "data/imagenet")
        c.integer("image_size", 1, "224")
        c.numbers("crop_scale", "[0.08,1.0]", "two finite numbers 0 < a <= b <= 1",
                  lambda a, b: 0 < a <= b <= 1)
        c.numbers("crop_ratio", "[0.75,1.333]", "two finite numbers 0 < a <= b",
                  lambda a, b: 0 < a <= b)
        c.number("val_resize_ratio", "0.875", gt=0, le=1)
        c.numbers("mean", "[0.485,0.456,0.406]", "three finite numbers", lambda *m: True)
        c.numbers("std", "[0.229,0.224,0.225]", "three finite numbers > 0",
                  lambda *s: min(s) > 0)
        c.integer("batch_size", 1, "256")
        c.integer("workers", 0, "4", " (0 = load in the main process)")
        c.number("max_bad_fraction", "0.01", ge=0, le=1)
        c.url("endpoint_url", "http://localhost:9000")
        c.integer("shard_block", 1, "128")
        c.integer("shuffle_window", 1, "16")
        c.integer("prefetch", 0, "16")
        c.integer("fetch_threads", 1, "8")
        c.number("cache_gb", "16", gt=0)
        if self.backend == "torch" and self.dtype != "float32":  # PIL + torchvision: float32 NCHW
            c.fail("dtype", "applies to data.backend=dali or synthetic; data.backend=torch "
                   "gives float32", "float32")
        if self.backend == "torch" and self.channels_last:
            c.fail("channels_last", "applies to data.backend=dali or synthetic; with "
                   "data.backend=torch set train.channels_last=true instead", "false")
        if self.backend == "torch" and is_remote(self.root) and not is_manifest(self.root):
            shards = self.root.rstrip("/") + "-shards"
            c.fail("root", "is an image folder in object storage, which only data.backend=dali "
                   "reads (one request per image); convert it to tar shards, which both back "
                   f"ends read from there: python -m pipeline prepare shards {self.root} --out "
                   f"{shards}", f"{shards}/shards.json")


@dataclass
class ModelConfig:
    name: str = "resnet_ann_cifar20"  # any name registered with timm by pipeline.models
    num_classes: int = 0  # 0: the number of class folders in the data set
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model

    def __post_init__(self) -> None:
        # Whether the name is registered needs torch and the models: the trainer checks it.
        c = _Check(self, "model.")
        c.text("name", "resnet_ann_cifar20")
        c.integer("num_classes", 0, "1000", " (0 = one per class folder)")
        for key in self.kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                c.fail("kwargs", f"needs argument names as keys, not {key!r}", "{depth: 20}")


@dataclass
class LossConfig:
    scheme: str = "sieve"  # const, linear, half_end, opt, sieve, sieve_orig, adaloss
    opt_exit: int = 0  # for scheme=opt: 1-based exit; 0 = the final exit
    alternating: bool = False  # the seed's AANN: add one exit's loss drawn from the weights
    # The drawn exit's extra weight: "seed" B_L (SPEC); "authors" sum(B) / sum_rand_ratio, and
    # the final exit on the first step (their code). For SIEVE and HALF-END, whose weights sum to
    # 2 B_L, they differ only in the first step. With ADALOSS (which the authors never combine
    # with alternating) sum(B) is that of the current adaptive weights.
    alternating_rule: Literal["seed", "authors"] = "seed"
    sum_rand_ratio: float = 2.0  # alternating_rule=authors only
    adaloss_update_every: int = 100
    adaloss_momentum: float = 0.9
    adaloss_gamma: float = 0.07
    adaloss_final_boost: float = 0.0

    def __post_init__(self) -> None:
        c = _Check(self, "loss.")
        if self.scheme not in SCHEMES:
            c.fail("scheme", f"is not a loss weight scheme{_near(str(self.scheme), list(SCHEMES))}"
                   f" (schemes: {', '.join(SCHEMES)})", "sieve")
        # The upper bound is the model's number of exits, checked where the loss is built.
        c.integer("opt_exit", 0, "1", " (0 = the final exit)")
        if self.alternating and self.scheme == "opt":
            # One exit has a loss, so the draw always picks it: alternating would only rescale
            # it (OPT at the final exit: its loss doubled, i.e. the learning rate; at an earlier
            # exit the seed's rule adds B_L = 0). The authors turn it off.
            c.fail("alternating", "does not go with loss.scheme=opt (a plain network: only one "
                   "exit has a loss, alternating would just rescale it)", "false")
        # Keys that would do nothing are refused: whoever set them expects an effect.
        if self.alternating_rule != "seed" and not self.alternating:
            c.fail("alternating_rule", "needs loss.alternating=true (without it no exit is "
                   "drawn)", "seed")
        c.number("sum_rand_ratio", "2.0", gt=0)
        if self.sum_rand_ratio != 2.0 and self.alternating_rule != "authors":
            c.fail("sum_rand_ratio", "applies only with loss.alternating_rule=authors (the "
                   "seed's rule adds B_L)", "2.0")
        c.integer("adaloss_update_every", 1, "100")
        c.number("adaloss_momentum", "0.9", ge=0, lt=1)
        c.number("adaloss_gamma", "0.07", ge=0, le=1)
        c.number("adaloss_final_boost", "0.0", ge=0)


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name: sgd (nesterov), momentum, adamw, ...
    lr: float = 0.1  # for the reference batch of 256; scaled by global batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        c = _Check(self, "optim.")
        problem = _optimizer_problem(self.name)
        if problem:
            c.fail("name", problem, "sgd")
        c.number("lr", "0.1", gt=0)
        c.number("momentum", "0.9", ge=0, lt=1)
        c.number("weight_decay", "1e-4", ge=0)
        c.number("grad_clip", "1.0", ge=0, note=" (0 = off)")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-4
    min_lr: float = 0.0
    decay_epochs: list[int] = field(default_factory=lambda: [30, 60, 90])  # for name=step
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        c = _Check(self, "schedule.")
        c.number("warmup_epochs", "5", ge=0)
        c.number("warmup_lr", "1e-4", ge=0)
        c.number("min_lr", "0.0", ge=0)
        epochs = self.decay_epochs  # whole numbers already (the type check)
        if any(e < 0 for e in epochs) or any(a >= b for a, b in zip(epochs, epochs[1:])):
            c.fail("decay_epochs", "must be increasing whole epochs >= 0", "[30,60,90]")
        c.number("decay_rate", "0.1", gt=0, le=1)


@dataclass
class TrainConfig:
    epochs: int = 90
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    log_every: int = 50  # steps between progress lines
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; small values for smoke tests
    # Images per optimizer step over all processes: the recipe's batch, which stays the same when
    # a resumed job has another number of processes (gradient accumulation makes it up, in
    # passes of at most data.batch_size). 0 = the run's own on a resume (the checkpoint's),
    # data.batch_size x the number of processes on a new run.
    global_batch: int = 0
    # Resume with an explicit train.global_batch other than the checkpoint's (the lr is scaled
    # to the new batch; the schedule goes on by epochs). Without it such a resume is refused.
    allow_batch_change: bool = False
    # torch.compile the training step's forward + anytime loss, and so their backward
    # (pipeline/train/step.py). The first steps compile (seconds to minutes).
    # Off by default until benchmarks/gpu_window.sh shows that it pays (docs/throughput.md).
    # compile_mode: "reduce-overhead" adds CUDA graphs; compile_backend "aot_eager" (no code
    # generation) and "eager" are for debugging a compiled run.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"

    def __post_init__(self) -> None:
        c = _Check(self, "train.")
        c.integer("epochs", 1, "90")
        c.integer("log_every", 1, "50")
        c.integer("max_steps_per_epoch", 0, "10", " (0 = the whole epoch)")
        c.integer("global_batch", 0, "1024", " (0 = the run's own, or data.batch_size x "
                  "processes for a new run)")


@dataclass
class CheckpointConfig:
    url: str = ""  # fsspec URL or path (s3://bucket/prefix, gs://..., file://...); "" = run folder
    endpoint_url: str = ""  # an S3-compatible server (MinIO, Ceph, ...); "" = AWS
    every_steps: int = 0  # also save every N steps within an epoch; 0 = at epoch ends only
    async_save: bool = True  # write in a background thread; preemption saves are always blocking
    keep_last: int = 3  # the newest N checkpoints; 0 = keep every checkpoint
    keep_every_epochs: int = 0  # also keep every N-th epoch's checkpoint; 0 = none
    retries: int = 4  # per storage call, with exponential backoff from retry_delay seconds
    retry_delay: float = 1.0
    max_failed_saves: int = 3  # stop the run after this many failed saves in a row
    # Seconds a writer's lease on the checkpoint location lasts without a heartbeat; a second
    # trainer is refused while it lasts.
    lease_ttl: float = 120.0

    def __post_init__(self) -> None:
        c = _Check(self, "checkpoint.")
        c.url("endpoint_url", "http://localhost:9000")
        c.integer("every_steps", 0, "1000", " (0 = at epoch ends only)")
        c.integer("keep_last", 0, "3", " (0 = keep all)")
        c.integer("keep_every_epochs", 0, "10", " (0 = none)")
        c.integer("retries", 0, "4")
        c.number("retry_delay", "1.0", ge=0)
        c.integer("max_failed_saves", 1, "3")
        c.number("lease_ttl", "120", gt=0, le=3600,
                 note=" (a lease record is trusted for at most an hour)")


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

    def __post_init__(self) -> None:
        c = _Check(self, "")
        c.text("name", "demo")
        if self.name in (".", "..") or any(ch in self.name for ch in "/\\\0") \
                or self.name != self.name.strip():
            c.fail("name", "must be a plain folder name (no /, no surrounding spaces, not . "
                   "or ..); the run lives in out_dir/name", "demo")
        c.text("out_dir", "runs")
        # Each rank seeds numpy with seed + rank, which must stay below 2**32.
        if not 0 <= self.seed < 2**31:
            c.fail("seed", "must be an integer in [0, 2**31)", "0")
        if self.data.dtype == "float16" and self.train.amp == "none":  # fp16 images, fp32 weights
            raise UserError("data.dtype=float16 needs mixed precision: set train.amp=bf16 or "
                            "fp16, or data.dtype=float32")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(self.run_dir / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def batch_geometry(self, world_size: int, global_batch: int = 0,
                       source: str = "") -> tuple[int, int]:
        """(images per process per forward pass, forward passes per optimizer step) on
        `world_size` processes: `global_batch` (default train.global_batch) split evenly over
        the processes, in the fewest passes of at most data.batch_size; (data.batch_size, 1)
        when neither is set. `source` says where a given `global_batch` came from, for the
        error (e.g. "the run's global batch of 64 (checkpoint ...)")."""
        total = global_batch or self.train.global_batch
        if not total:
            return self.data.batch_size, 1
        if total % world_size:
            fits = [total // world_size * world_size, -(-total // world_size) * world_size]
            examples = " or ".join(str(n) for n in fits if n)
            raise UserError(f"{source or f'train.global_batch={total}'} does not split evenly "
                            f"over {world_size} processes; run on a number of processes that "
                            f"divides it, or set train.global_batch to a multiple of "
                            f"{world_size} (e.g. {examples}; resuming a run, also "
                            f"train.allow_batch_change=true)")
        per_process = total // world_size
        passes = next(a for a in range(1, per_process + 1)
                      if per_process % a == 0 and per_process // a <= self.data.batch_size)
        return per_process // passes, passes


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
    return config_from_dict(with_model_data_defaults(with_overrides(raw, overrides)))


def with_model_data_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the input size, mean and std it leaves unset taken from the model's pretrained
    cfg, in place, as timm's `resolve_data_config` does: 32x32 and CIFAR-10 statistics for the
    CIFAR models, 224 and ImageNet's for the others (the data section's defaults). The run's
    stored config holds the values, so a resume compares and reuses them."""
    model, data = raw.get("model"), raw.setdefault("data", {})
    name = model.get("name", ModelConfig.name) if isinstance(model, dict) else ModelConfig.name
    if not isinstance(data, dict) or not isinstance(name, str):
        return raw  # the section's own checks name the problem
    pretrained = _pretrained_cfg(name)
    if pretrained is None:  # not a timm model: the trainer names the registered ones
        return raw
    data.setdefault("image_size", pretrained.input_size[-1])
    data.setdefault("mean", list(pretrained.mean))
    data.setdefault("std", list(pretrained.std))
    return raw


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


# What a resumed run may change, each with why: these steer where and how the run goes on, not
# what it computes. Every other key is refused (fail closed, so a field added later is refused
# until someone decides otherwise). Refused, among others: model.* (the saved weights fit one
# architecture), loss.* (the loss state and the experiment's weighting), optim.* and schedule.*
# (a different recipe; the optimizer state belongs to the saved one), seed, the data
# augmentation (image_size, augment, crop_*, mean, std, val_resize_ratio: what the model learns
# from), train.amp (precision changes the
# numerics of every step, and fp16's GradScaler state means nothing to bf16 or none),
# and train.max_steps_per_epoch (the step <-> epoch mapping the saved step and schedule rely on).
RESUME_MAY_CHANGE: dict[str, str] = {
    "train.epochs": "a longer or shorter run; the lr schedule is recomputed for the new length",
    "train.log_every": "logging only",
    "train.device": "where the steps run; the state loads onto any device",
    "train.channels_last": "memory layout only; the same computation",
    "train.compile": "how the step runs; checkpoints are the same compiled or not",
    "train.compile_mode": "how the step runs",
    "train.compile_backend": "how the step runs",
    # The global batch they make up is checked against the checkpoint's on its own (the trainer:
    # refused unless train.allow_batch_change), so the processes may change under it.
    "train.global_batch": "how the global batch is set; the batch itself is checked separately",
    "data.batch_size": "images per forward pass; the global batch is checked separately",
    "train.allow_batch_change": "whether this resume may change the global batch",
    "data.root": "the same data set moved (a local copy, a bucket); the trainer checks that it "
                 "is the same (its classes, images per class and file names)",
    "data.allow_sample_change": "whether this resume may go on with other training images",
    "data.endpoint_url": "where the data's server is",
    "data.backend": "the loader implementation, with the same augmentations",
    "data.workers": "loader processes only",
    "data.file_lists": "where the verified image lists are kept",
    "data.max_bad_fraction": "when to give up on undecodable images, a policy",
    "data.dtype": "the loader's output type; the model computes in train.amp's precision",
    "data.channels_last": "memory layout only",
    "data.dali_device": "where DALI decodes",
    "checkpoint": "where, how often and how safely state is saved, not what is trained",
    "out_dir": "where the run folder lies",
    # The trainer refuses it where checkpoint.url is set: there, a new name is how a new run is
    # started, and the old name's checkpoints must not continue under it.
    "name": "the run folder renamed: its checkpoints moved with it",
    "resume": "how this start treats the run folder",
}


def classify_resume_changes(saved: dict[str, Any],
                            new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What resuming a checkpoint saved with config `saved` under config `new` changes.

    Both are `Config.to_dict()` dicts; `saved` may come from older code: a key it lacks counts as
    today's default and a key today's Config lacks is ignored. Returns (refused, accepted): sorted
    `"dotted.key: old -> new"` lines, refused unless `RESUME_MAY_CHANGE` allows the key. Free-form
    mappings (model.kwargs) are compared key by key, e.g. `model.kwargs.depth: 20 -> 32`."""
    defaults = Config().to_dict()
    old = _flatten(_known(Config, saved, defaults))
    now = _flatten(_known(Config, new, defaults))
    refused: list[str] = []
    accepted: list[str] = []
    for key in sorted(old.keys() | now.keys()):
        before, after = old.get(key, _UNSET), now.get(key, _UNSET)
        if before == after:
            continue
        line = f"{key}: {_show(before)} -> {_show(after)}"
        allowed = any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)
        (accepted if allowed else refused).append(line)
    return refused, accepted


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


_UNSET = _Unset()


def _known(cls: type, raw: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """`raw`'s values for the fields of `cls` (recursively), defaults where it has none."""
    raw = raw if isinstance(raw, dict) else {}
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _known(hints[f.name], raw.get(f.name), defaults[f.name])
        else:
            out[f.name] = _plain(raw.get(f.name, defaults[f.name]))
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty mapping adds no keys
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4, nan and inf as strings; the range checks refuse nan and inf
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # names like "50" typed bare on the command line
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise UserError(f"{key}={value!r} must be of type {hint.__name__}")
    return value


class _Check:
    """Value checks of one config section, run by its `__post_init__` (so on every construction,
    after `_coerce` when loading). Each failure is a one-line UserError naming the dotted key, the
    value, the allowed range and an example of a good value."""

    def __init__(self, section: Any, prefix: str):
        """Checks (and converts, as loading does) every field's type and choices first, so the
        value checks below also hold for a section built directly in code."""
        self.section, self.prefix = section, prefix
        hints = _hints(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if not isinstance(value, hints[f.name]):
                    raise UserError(f"{prefix}{f.name} must be a section (a mapping), "
                                    f"got {value!r:.60}")
            else:
                setattr(section, f.name, _coerce(hints[f.name], value, prefix + f.name))

    def fail(self, name: str, rule: str, example: str) -> typing.NoReturn:
        key = self.prefix + name
        raise UserError(f"{key}={_show(getattr(self.section, name))} {rule}; e.g. {key}={example}")

    def integer(self, name: str, low: int, example: str, note: str = "") -> None:
        if getattr(self.section, name) < low:  # the type is checked already
            self.fail(name, f"must be an integer >= {low}{note}", example)

    def number(self, name: str, example: str, *, gt: float | None = None,
               ge: float | None = None, lt: float | None = None, le: float | None = None,
               note: str = "") -> None:
        value = getattr(self.section, name)
        ok = (math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge)
              and (lt is None or value < lt) and (le is None or value <= le))
        if not ok:
            low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else ""
            high = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else ""
            if low and high:
                bounds = f" in {low}, {high}"  # e.g. in [0, 1)
            elif low:
                bounds = f" {'>' if low[0] == '(' else '>='} {low[1:]}"
            else:
                bounds = f" {'<' if high[-1] == ')' else '<='} {high[:-1]}" if high else ""
            self.fail(name, f"must be a finite number{bounds}{note}", example)

    def numbers(self, name: str, example: str, rule: str,
                test: typing.Callable[..., bool]) -> None:
        values = getattr(self.section, name)
        if not all(math.isfinite(v) for v in values) or not test(*values):
            self.fail(name, f"must be {rule}", example)

    def text(self, name: str, example: str) -> None:
        if not getattr(self.section, name).strip():
            self.fail(name, "must not be empty", example)

    def url(self, name: str, example: str) -> None:
        value = getattr(self.section, name)
        if value and "://" not in value:
            self.fail(name, "must be a URL with a scheme, or empty", example)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _show(value: Any) -> str:
    """A value as a user would type it in an override, on one line."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pretrained_cfg(model_name: str) -> Any:
    try:  # lazily: the models import torch and timm (seconds)
        from pipeline.models import pretrained_cfg
    except ImportError:  # a launcher-only environment: the trainer's own load resolves them
        return None
    return pretrained_cfg(model_name)


@functools.cache
def _timm_optimizers() -> tuple[str, ...]:
    from timm.optim import list_optimizers  # lazily: timm imports torch (seconds)

    return tuple(list_optimizers())


def _optimizer_problem(name: str) -> str:
    """What is wrong with `name` as timm's `create_optimizer_v2(opt=name)`, or "" when nothing.

    timm lower-cases the name, splits it at "_", uses the last part and wraps the optimizer in
    Lookahead when the first part is "lookahead". Any other prefix timm silently drops, so it is
    refused here (a typo that would train with a different optimizer than the one named)."""
    try:
        known = _timm_optimizers()
    except ImportError:  # a launcher-only environment: the trainer's own import will check
        return ""
    base = name.lower().removeprefix("lookahead_")
    if base in known:
        return ""
    near = difflib.get_close_matches(base, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}?" if near else \
        "see timm.optim.list_optimizers() for the names"
    return f"is not a timm optimizer; {hint} (a lookahead_ prefix is allowed)"


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
