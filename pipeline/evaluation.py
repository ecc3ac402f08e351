"""Evaluate trained checkpoints: every exit's top-1 / top-5 error and cost on a validation set.

    member = load_member("s3://bucket/runs/r50/checkpoints", endpoint_url="http://minio:9000")
    [result] = run_exits([member.model], loader, device, per_image=True)
    result.top1, result.confidence  # per-exit errors; [N, exits] top softmax probabilities

`python -m pipeline eval` (see `evaluate_checkpoint`) writes eval.json and eval_curve.png; with
`--budgeted` also the budgeted-batch curve. In DDP every rank evaluates its shard; the errors are
all-reduced and the per-image records gathered, so rank 0 reports over the whole set.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.anytime.budgeted import budgeted_curve
from pipeline.anytime.metrics import ExitErrors
from pipeline.config import Config, config_from_dict, with_overrides
from pipeline.data.index import class_difference
from pipeline.errors import UserError
from pipeline.report import format_duration
from pipeline.saved_run import SavedRun
from pipeline.storage.atomic import write_atomically
from pipeline.storage.checkpoints import CheckpointStore

log = logging.getLogger("pipeline.eval")


@dataclass
class Member:
    """A trained anytime network rebuilt from its checkpoint's own config."""

    model: nn.Module
    config: Config
    num_classes: int
    source: str  # the checkpoint's URL, e.g. s3://bucket/run/checkpoints/step-00000468
    step: int
    # The class folders it was trained on, from its meta (pipeline/data/index.py DataIdentity);
    # None where it records none (an older version, synthetic data) or none that reads.
    classes: tuple[str, ...] | None = None


@dataclass
class ExitResults:
    top1: list[float]  # error (%) per exit
    top5: list[float]
    samples: int
    # Per-image records, only with run_exits(per_image=True) (budgeted evaluation needs them):
    confidence: torch.Tensor | None  # [samples, exits] top softmax probability (float32, CPU)
    correct: torch.Tensor | None  # [samples, exits] top-1 correct (bool, CPU)


def load_member(url: str, endpoint_url: str = "",
                map_location: str | torch.device = "cpu") -> Member:
    """The model of the checkpoint at `url`: a checkpoint folder (`.../step-00000468`), a
    checkpoints folder (its newest valid checkpoint) or a run folder holding `checkpoints/`."""
    from pipeline.models import create_anytime_model, weights_mismatch

    url = url.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if re.fullmatch(r"step-\d+", name):
        store = CheckpointStore(url.rsplit("/", 1)[0], endpoint_url=endpoint_url, retries=2)
        info = next((i for i in store.list() if i.name == name), None)
        if info is None:
            raise UserError(f"no checkpoint {url} (no such folder); list them with "
                            f"`python -m pipeline checkpoints list {store.url}`")
        found = info, store.load(info, map_location)  # a broken one: UserError naming why
    else:
        store = CheckpointStore(url, endpoint_url=endpoint_url, retries=2)
        found = store.load_latest_valid(map_location)
        if found is None:  # a run folder: its checkpoints live one level down
            inner = CheckpointStore(f"{url}/checkpoints", endpoint_url=endpoint_url, retries=2)
            found = inner.load_latest_valid(map_location)
            store = inner if found is not None else store
        if found is None:
            raise UserError(f"no valid checkpoint at {url}; give a run's checkpoints folder "
                            "(runs/NAME/checkpoints, s3://bucket/prefix) or one checkpoint "
                            "(.../step-00000468)")
    info, state = found
    saved = SavedRun.of(store, info, state)
    if saved.config is None or "model" not in saved.state:
        raise UserError(f"checkpoint {saved.where} has no config or model state; was it written "
                        "by `python -m pipeline train`?")
    cfg = config_from_dict(saved.config)
    num_classes = cfg.model.num_classes or _num_classes(saved.state["model"])
    model = create_anytime_model(cfg.model.name, num_classes, **cfg.model.kwargs)
    mismatch = weights_mismatch(model, saved.state["model"])
    if mismatch:
        raise UserError(f"checkpoint {saved.where} does not fit the model of its own config "
                        f"({cfg.model.name}, {cfg.model.kwargs}): {mismatch}")
    model.load_state_dict(saved.state["model"])
    model.eval()
    return Member(model, cfg, num_classes, saved.where, info.step, _trained_classes(saved))


def _trained_classes(saved: SavedRun) -> tuple[str, ...] | None:
    try:
        dataset = saved.dataset
    except ValueError as e:
        log.warning("checkpoint %s records its data set in a form this code does not read "
                    "(meta.dataset %s): only the number of classes is checked", saved.where, e)
        return None
    return None if dataset is None else dataset.classes


def _num_classes(model_state: dict[str, torch.Tensor]) -> int:
    """Classes = the output width of the exits' linear layers (the trainer's config leaves
    model.num_classes at 0 when the data set decides)."""
    widths = {v.shape[0] for k, v in model_state.items()
              if k.startswith("exits.") and k.endswith(".weight") and v.ndim == 2}
    if len(widths) != 1:
        raise UserError(f"cannot tell the number of classes from the checkpoint (exit widths "
                        f"{sorted(widths)}); set model.num_classes in its config")
    return widths.pop()


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """The config with dotted overrides (`data.batch_size=64`) applied and validated again."""
    return config_from_dict(with_overrides(cfg.to_dict(), overrides))


@torch.no_grad()
def run_exits(models: list[nn.Module], loader: Any, device: torch.device,
              autocast: AbstractContextManager | None = None,
              per_image: bool = False) -> list[ExitResults]:
    """Every exit of every model on every image of `loader` (this rank's shard); errors summed
    over ranks. With `per_image`, also each image's confidence and correctness per exit,
    gathered from every rank in the loader's image order (a device-to-host copy per batch, so
    only when asked)."""
    autocast = autocast or nullcontext()
    errors = [ExitErrors(m.num_exits, device) for m in models]
    confidence: list[list[torch.Tensor]] = [[] for _ in models]
    correct: list[list[torch.Tensor]] = [[] for _ in models]
    loader.set_epoch(0)
    started, seen = time.perf_counter(), 0
    for batch, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for i, model in enumerate(models):
            with autocast:
                logits = model(images)
            errors[i].update(logits, labels)
            if not per_image:
                continue
            top = torch.stack([out.float().softmax(dim=1) for out in logits], dim=1).max(dim=2)
            confidence[i].append(top.values.cpu())
            correct[i].append(top.indices.eq(labels[:, None]).cpu())
        seen += labels.shape[0]
        if (batch + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            eta = elapsed / (batch + 1) * (len(loader) - batch - 1)
            log.info("evaluated %d images, batch %d/%d (%.0f img/s on this rank, eta %s)", seen,
                     batch + 1, len(loader), seen / elapsed, format_duration(eta))
    results = []
    for i, model in enumerate(models):
        e = errors[i].compute()
        conf = hits = None
        if per_image:
            conf = _gather_rows(_cat(confidence[i], model.num_exits, torch.float32))
            hits = _gather_rows(_cat(correct[i], model.num_exits, torch.bool))
        results.append(ExitResults(e["top1"], e["top5"], e["samples"], conf, hits))
    return results


def _cat(parts: list[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, width, dtype=dtype)


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, interleaved as the unpadded eval sampler dealt them (image i went to
    rank i % world), so the order is the single-process one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    world, total = len(parts), sum(p.shape[0] for p in parts)
    if any(p.shape[0] != len(range(r, total, world)) for r, p in enumerate(parts)):
        return torch.cat(parts)  # images failed to decode: the deal is lost, keep rank order
    out = torch.empty(total, *rows.shape[1:], dtype=rows.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def evaluate_checkpoint(url: str, data_root: str, *, split: str = "val", endpoint_url: str = "",
                        overrides: list[str] = (), device: str = "auto", amp: str = "none",
                        out_dir: str | Path | None = None, budgeted: int = 0,
                        print_json: bool = False) -> dict[str, Any]:
    """The `eval` verb: per-exit errors and costs of one checkpoint, its JSON and plot."""
    from pipeline.data import build_loader
    from pipeline.job import open_job
    from pipeline.models import exit_costs
    from pipeline.report import format_table, plot_anytime_curve

    with open_job(device, amp) as job:  # closes the process group however it ends
        torch_device, dist_info = job.device, job.dist
        member = load_member(url, endpoint_url, map_location="cpu")
        cfg = apply_overrides(member.config, [f"data.root={data_root}", *overrides])
        loader = build_loader(cfg.data, split, train=False, rank=dist_info.rank,
                              world_size=dist_info.world_size, seed=cfg.seed)
        check_classes(member, loader.classes, f"{data_root}/{split}")
        model = member.model.to(torch_device)
        log.info("evaluating %s (%s, %d exits) on %s/%s: %d images on %s x %d", member.source,
                 cfg.model.name, model.num_exits, data_root, split, loader.num_samples,
                 torch_device, dist_info.world_size)
        [result] = run_exits([model], loader, torch_device, job.autocast,
                             per_image=budgeted > 0)
        costs = exit_costs(model, (3, cfg.data.image_size, cfg.data.image_size))
        report = {
            "checkpoint": member.source, "model": cfg.model.name, "data": f"{data_root}/{split}",
            "image_size": cfg.data.image_size, "samples": result.samples, "amp": amp,
            "cost_unit": "multiply-adds per image, cumulative, every earlier head included",
            "exits": [{**c.to_dict(), "top1_error": result.top1[i], "top5_error": result.top5[i]}
                      for i, c in enumerate(costs)],
        }
        if budgeted:
            curve = budgeted_curve(result.confidence, result.correct, [c.macs for c in costs],
                                   points=budgeted)
            report["budgeted"] = [r.to_dict() for r in curve]
        unwritten = ""  # why the files could not be written; the results are printed anyway
        if dist_info.is_main:
            out = Path(out_dir or f"runs/eval-{cfg.name}")
            try:
                out.mkdir(parents=True, exist_ok=True)
                write_atomically(out / "eval.json", json.dumps(report, indent=1).encode())
                plot_anytime_curve([c.macs for c in costs],
                                   {"top-1": result.top1, "top-5": result.top5},
                                   out / "eval_curve.png",
                                   title=f"{cfg.name}: {cfg.model.name} on {split} "
                                         f"({result.samples} images)")
                if budgeted:
                    plot_budgeted(report["budgeted"], [(c.macs, result.top1[i])
                                                       for i, c in enumerate(costs)],
                                  out / "budgeted.png", f"{cfg.name}: budgeted batch evaluation")
            except OSError as e:  # a full disk, a read-only place
                unwritten = (f"the evaluation above could not be written to {out}: "
                             f"{e.strerror or e}; give --out a writable folder")
            if print_json:
                print(json.dumps(report, indent=1))
            else:
                rows = [{"exit": c.index, "position": c.position, "MMACs": c.macs / 1e6,
                         "top1_err%": result.top1[i], "top5_err%": result.top5[i]}
                        for i, c in enumerate(costs)]
                print(f"{member.source} on {data_root}/{split} ({result.samples} images):")
                print(format_table(rows, list(rows[0])))
                if budgeted:
                    print_budgeted(report["budgeted"])
                if not unwritten:
                    print(f"results: {out / 'eval.json'}  plot: {out / 'eval_curve.png'}")
    if unwritten:
        raise UserError(unwritten)
    return report


def check_classes(member: Member, classes: list[str], where: str) -> None:
    """Refuse data whose classes are not the member's: labels are positions in the sorted
    class list, so other class folders would score every image against another label."""
    change = class_difference(member.classes, classes, "the checkpoint", "the data") \
        if member.classes is not None else None
    if change:
        raise UserError(f"{where} has other class folders than {member.source} was trained on "
                        f"({change}); labels are positions in the sorted class list: evaluate "
                        "on the data set it was trained on")
    if len(classes) != member.num_classes:
        raise UserError(f"{where} has {len(classes)} classes but {member.source} was trained "
                        f"on {member.num_classes}; evaluate on the data set it was trained on")


def print_budgeted(rows: list[dict]) -> None:
    from pipeline.report import format_table

    table = [{"target MMACs": r["target_cost"] / 1e6, "avg MMACs": r["cost"] / 1e6,
              "top1_err%": r["error"], "accuracy%": 100 - r["error"]} for r in rows]
    print("budgeted batch evaluation (thresholds chosen on even images, scored on odd ones):")
    print(format_table(table, list(table[0])))


def plot_budgeted(rows: list[dict], static: list[tuple[float, float]], path: Path,
                  title: str) -> Path:
    """Accuracy against average cost of the budgeted cascade, with every single exit's
    accuracy at its own cost for reference."""
    from pipeline.report import plot_series

    return plot_series(
        [{"label": "budgeted cascade (avg cost)", "x": [r["cost"] for r in rows],
          "y": [100 - r["error"] for r in rows]},
         {"label": "every image to the same output (static)", "x": [m for m, _ in static],
          "y": [100 - e for _, e in static], "linestyle": ":"}],
        path, ylabel="validation top-1 accuracy (%)", title=title,
        xlabel="average multiply-adds per image (millions)")
