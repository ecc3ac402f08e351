"""The training loop. Reads top to bottom: set up, maybe resume, then epochs of train + validate +
checkpoint, then the per-exit results.

    results = train(load_config("configs/demo_fmnist_resnet_ann.yaml"))
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch.nn.parallel import DistributedDataParallel

from pipeline.anytime.loss import AnytimeLoss
from pipeline.anytime.metrics import ExitErrors
from pipeline.config import Config, OptimConfig, ScheduleConfig, classify_resume_changes
from pipeline.data import Loader, build_loader
from pipeline.data.index import DataIdentity
from pipeline.distributed import DistInfo, any_rank, mean_over_ranks, run_on_main
from pipeline.errors import TrainingDiverged, UserError
from pipeline.job import open_job
from pipeline.models import create_anytime_model, exit_costs, weights_mismatch
from pipeline.report import format_duration, format_table, plot_anytime_curve
from pipeline.saved_run import SavedRun
from pipeline.storage.atomic import write_atomically
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.storage.lease import LeaseUnsupportedError, RunLease
from pipeline.train.checkpointing import Checkpointer
from pipeline.train.preemption import watch_preemption
from pipeline.train.progress import MetricsWriter, Progress, RunClock
from pipeline.train.state import RunState, seed_everything
from pipeline.train.step import TrainStep

log = logging.getLogger("pipeline.train")


def train(cfg: Config,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` to the end (or continue it, with resume=auto); returns the final results.

    `on_epoch_end`, when given, is called on every rank after each validation with the epoch,
    step and per-exit errors (a launcher reports them to its scheduler, e.g. Ray Train)."""
    preemption = watch_preemption()  # first: a signal during set-up still exits EXIT_PREEMPTED
    with ExitStack() as teardown:  # runs last to first, however the run ends
        job = teardown.enter_context(open_job(cfg.train.device, cfg.train.amp))
        device, dist_info, autocast = job.device, job.dist, job.autocast
        seed_everything(cfg.seed + dist_info.rank)
        teardown.callback(preemption.restore)
        clock = RunClock()
        run_on_main(lambda: make_run_dir(cfg))
        store = CheckpointStore(
            cfg.checkpoint_url, keep_last=cfg.checkpoint.keep_last,
            keep_every_epochs=cfg.checkpoint.keep_every_epochs,
            endpoint_url=cfg.checkpoint.endpoint_url, retries=cfg.checkpoint.retries,
            retry_delay=cfg.checkpoint.retry_delay,
        )
        lease = run_on_main(lambda: take_run_lease(cfg, store))  # one writer, before all else
        if lease is not None:
            teardown.callback(lease.release)
        # The store's and the lease's S3 clients are made and connected by now, before the
        # loaders: DALI sets AWS_ENDPOINT_URL while it makes its own (pipeline/data/dali.py).
        saved = find_checkpoint(cfg, store, dist_info.world_size)  # SavedRun, or None
        global_batch = choose_global_batch(cfg, saved, dist_info.world_size)
        source = f"the run's global batch of {global_batch} (checkpoint {saved.where})" \
            if saved is not None and not cfg.train.global_batch else ""
        per_pass, passes = cfg.batch_geometry(dist_info.world_size, global_batch, source)
        if passes > 1 and per_pass < cfg.data.batch_size // 2:
            log.warning("a global batch of %d on %d processes: %d passes of only %d images per "
                        "step (data.batch_size=%d would fit); a global batch that is a multiple "
                        "of %d keeps the passes full", global_batch, dist_info.world_size,
                        passes, per_pass, cfg.data.batch_size,
                        dist_info.world_size * cfg.data.batch_size)
        train_loader = build_loader(replace(cfg.data, batch_size=per_pass), "train", train=True,
                                    rank=dist_info.rank, world_size=dist_info.world_size,
                                    seed=cfg.seed, accumulation=passes)
        val_loader = build_loader(cfg.data, "val", train=False, rank=dist_info.rank,
                                  world_size=dist_info.world_size, seed=cfg.seed)
        batch_text = f"{global_batch} ({per_pass} x {dist_info.world_size} processes" + \
            (f" x {passes} passes)" if passes > 1 else ")")
        if saved is not None and train_loader.identity is not None:  # synthetic data: None
            check_same_data(cfg, saved, train_loader.identity)
        run_on_main(lambda: record_config(cfg, saved))
        num_classes = cfg.model.num_classes or len(train_loader.classes)

        model = create_anytime_model(cfg.model.name, num_classes,
                                     **cfg.model.kwargs).to(device)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        criterion = AnytimeLoss(model.num_exits, cfg.loss, seed=cfg.seed).to(device)
        optimizer = build_optimizer(cfg.optim, model, global_batch)
        steps_per_epoch = train_loader.steps_per_epoch
        if cfg.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
        scheduler = build_scheduler(cfg.schedule, cfg.train.epochs, optimizer, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        # What every checkpoint of this start says of the run (the data: check_same_data)
        about = {"config": cfg.to_dict(), "world_size": dist_info.world_size,
                 "global_batch": global_batch, "code_version": code_version()}
        if train_loader.identity is not None:
            about["dataset"] = train_loader.identity.to_meta()
        run = RunState({"model": model, "optimizer": optimizer, "scaler": scaler,
                        "loss": criterion, "data": train_loader, "clock": clock},
                       rank=dist_info.rank, seed=cfg.seed, about=about)

        if saved is not None:
            mismatch = weights_mismatch(model, saved.state["model"])
            if mismatch:  # other classes, from a checkpoint that did not record its data
                raise UserError(f"checkpoint {saved.where} does not fit this run's model "
                                f"({mismatch}), with {num_classes} classes in data.root; resume "
                                "on the data set it was trained on, or "
                                f"{new_run_hint(cfg)}")
            run.load(saved)
            log.info("resumed from %s at epoch %d, step %d", saved.where, run.epoch, run.step)
            del saved  # its state is in the parts now: the memory of a second copy goes
        # The schedule goes by the epoch's progress (the same as the step count unless the
        # global batch changed), and is recomputed rather than restored: timm's scheduler keeps
        # its settings, which would undo an accepted change of train.epochs. It sets every
        # group's lr from the base rates it read when it was built (this config's, scaled to this
        # global batch), not from the restored optimizer's.
        scheduler.step_update(run.epoch * steps_per_epoch + train_loader.steps_done)

        ddp_model = model
        if dist_info.world_size > 1:
            ddp_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        metrics = MetricsWriter(cfg.run_dir, enabled=dist_info.is_main)
        teardown.callback(metrics.close)
        progress = Progress(cfg.train.epochs * steps_per_epoch, run.step, cfg.train.log_every,
                            enabled=dist_info.is_main)
        log.info("training %s (%d exits, %s loss%s) on %s: %d epochs x %d steps, batch %s",
                 cfg.model.name, model.num_exits, cfg.loss.scheme,
                 f" + alternating (rule: {cfg.loss.alternating_rule})" if cfg.loss.alternating
                 else "", device, cfg.train.epochs,
                 steps_per_epoch, batch_text)

        train_step = TrainStep(ddp_model, criterion, optimizer, scaler, autocast, device,
                               memory_format=memory_format, grad_clip=cfg.optim.grad_clip,
                               compile=cfg.train.compile, compile_mode=cfg.train.compile_mode,
                               compile_backend=cfg.train.compile_backend)
        loss = torch.zeros(())  # the last step's loss, checked before each save
        checkpointer = Checkpointer(
            store, run, cfg.checkpoint, writer=dist_info.is_main, lease=lease,
            # never a non-finite checkpoint
            before_save=lambda: stop_if_diverged(loss, model, run.step, device))
        teardown.callback(checkpointer.close)

        if preemption.requested(run.step, device, every=1):  # signalled while setting up
            log.warning("%s (%s) before the first step: nothing new to save; exiting",
                        preemption.stopped_as, preemption.signal_name)
            return preemption.result(cfg.name, run.step)
        val_errors = None
        while run.epoch < cfg.train.epochs:
            model.train()
            criterion.train()
            steps_left = max(0, steps_per_epoch - train_loader.steps_done)
            for batches in islice(train_loader.steps(), steps_left):
                loss, exit_losses = train_step(batches)
                run.step += 1
                scheduler.step_update(run.epoch * steps_per_epoch + train_loader.steps_done)
                progress.advance(sum(len(labels) for _, labels in batches) * dist_info.world_size)
                if progress.due(run.step):
                    stop_if_diverged(loss, None, run.step, device)
                    checkpointer.raise_if_fenced()  # now, not at the next save
                    exit_losses = mean_over_ranks(exit_losses)
                    values = {"loss": mean_over_ranks(loss).item(),
                              "final_exit_loss": exit_losses[-1].item(),
                              "lr": optimizer.param_groups[0]["lr"]}
                    progress.log(run.step, run.epoch, cfg.train.epochs, values)
                    metrics.write("train", run.step, {**values, "images_per_s": progress.rate})
                if preemption.requested(run.step, device):
                    checkpointer.save(end_of_epoch=False, blocking=True)
                    log.warning("%s (%s): checkpoint at step %d saved; exiting",
                                preemption.stopped_as, preemption.signal_name, run.step)
                    if dist_info.world_size > 1:  # no rank exits before the checkpoint is
                        torch.distributed.barrier()  # written: a launcher may kill the rest
                    return preemption.result(cfg.name, run.step)
                checkpointer.after_step(epoch_ends=train_loader.steps_done >= steps_per_epoch)
            run.epoch += 1
            train_loader.set_epoch(run.epoch)

            val_errors = evaluate(model, val_loader, device, memory_format, autocast)
            metrics.write("val", run.step, {"epoch": run.epoch, "top1": val_errors["top1"],
                                            "top5": val_errors["top5"],
                                            "weights": criterion.weights,
                                            "bad_images": len(train_loader.bad_files)})
            log.info("epoch %d/%d  val top-1 error per exit: %s", run.epoch, cfg.train.epochs,
                     " ".join(f"{e:.2f}" for e in val_errors["top1"]))
            checkpointer.after_epoch(last=run.epoch == cfg.train.epochs)
            if on_epoch_end is not None:
                on_epoch_end({"epoch": run.epoch, "step": run.step, "top1": val_errors["top1"],
                              "top5": val_errors["top5"]})

        checkpointer.wait()  # the last save is written, or the run fails here
        if val_errors is None:  # resumed a finished run: report it again
            val_errors = evaluate(model, val_loader, device, memory_format, autocast)
        return report(cfg, model, val_errors, clock.seconds, dist_info, run.step)


def take_run_lease(cfg: Config, store: CheckpointStore) -> RunLease | None:
    """The run's writer lease, held by the one process that writes checkpoints (rank 0); None
    where the storage cannot hold one (a warning says so)."""
    try:
        lease = RunLease(store.url, ttl=cfg.checkpoint.lease_ttl, fs=store.fs, root=store.root)
        lease.acquire()
    except LeaseUnsupportedError as e:
        log.warning("%s; one writer per run is not enforced there", e)
        return None
    except OSError as e:  # no permission, no such bucket: what StorageError says for saves
        raise UserError(f"cannot take the run lease at {store.url}: {type(e).__name__}: {e}; "
                        "check that checkpoint.url is writable and its credentials") from e
    return lease


def stop_if_diverged(loss: torch.Tensor, model: torch.nn.Module | None, step: int,
                     device: torch.device) -> None:
    """Raise TrainingDiverged on every rank when the loss (or, with `model`, any weight) of any
    rank is NaN or infinite. A host sync: called at log steps and before saves only."""
    bad = not torch.isfinite(loss).all()
    if model is not None and not bad:
        bad = not torch.stack([p.isfinite().all() for p in model.parameters()]).all()
    if any_rank(bool(bad), device):
        raise TrainingDiverged(
            f"training diverged at step {step}: the loss is {loss.item():.4g} (or a weight is not "
            "finite); no checkpoint holds this state. Lower optim.lr, set optim.grad_clip, or "
            "use train.amp=bf16 instead of fp16, then start again (resume=auto continues from "
            "the newest checkpoint, written before this)")


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module,
                    global_batch: int) -> torch.optim.Optimizer:
    """timm's optimizer factory; `optim.lr` is for a global batch of 256, scaled linearly."""
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr * global_batch / 256,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(cfg: ScheduleConfig, epochs: int, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> Scheduler:
    """timm's scheduler over `epochs` (train.epochs), updated every step (`step_update`)."""
    sched = {"cosine": "cosine", "step": "multistep"}[cfg.name]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_milestones=cfg.decay_epochs,
        decay_rate=cfg.decay_rate, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, device: torch.device,
             memory_format: torch.memory_format,
             autocast: AbstractContextManager) -> dict[str, list[float]]:
    model.eval()
    errors = ExitErrors(model.num_exits, device)
    loader.set_epoch(0)
    for images, labels in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast:
            logits = model(images)
        errors.update(logits, labels.to(device))
    return errors.compute()


def report(cfg: Config, model: torch.nn.Module, val_errors: dict, seconds: float,
           dist_info: DistInfo, step: int) -> dict[str, Any]:
    """Print the per-exit table, write results.json and the anytime-curve plot. Run after the
    final checkpoint is saved: a run folder that cannot take them (a full disk) is one line
    naming that checkpoint, which holds the training; no traceback."""
    costs = exit_costs(model, (3, cfg.data.image_size, cfg.data.image_size))
    rows = [{"exit": c.index, "position": c.position, "MMACs": c.macs / 1e6,
             "top1_err%": val_errors["top1"][i], "top5_err%": val_errors["top5"][i]}
            for i, c in enumerate(costs)]
    results = {"name": cfg.name, "seconds": seconds, "val_samples": val_errors["samples"],
               "exits": [{**c.to_dict(), "top1_error": val_errors["top1"][i],
                          "top5_error": val_errors["top5"][i]} for i, c in enumerate(costs)]}
    if dist_info.is_main:
        print(f"\nper-exit validation error of {cfg.name} ({val_errors['samples']} images), "
              f"after {format_duration(seconds)}:")
        print(format_table(rows, ["exit", "position", "MMACs", "top1_err%", "top5_err%"]))
        path = cfg.run_dir / "results.json"
        try:
            write_atomically(path, json.dumps(results, indent=1).encode())  # or the old one
            path = cfg.run_dir / "anytime_curve.png"
            plot_anytime_curve([c.macs for c in costs],
                               {"top-1": val_errors["top1"], "top-5": val_errors["top5"]},
                               path, title=f"{cfg.name}: {cfg.model.name}, {cfg.loss.scheme}")
        except OSError as e:
            if path.suffix == ".png":
                with suppress(OSError):
                    path.unlink(missing_ok=True)  # never a half-drawn plot
            raise UserError(f"training finished, but {path} could not be written: "
                            f"{e.strerror or e}. The final checkpoint, step {step}, is saved "
                            f"in {cfg.checkpoint_url}: once {cfg.run_dir} can be written (free "
                            "space), run the same command with resume=auto to write the results "
                            "from it without training again") from e
        print(f"results: {cfg.run_dir / 'results.json'}  plot: {path}  "
              f"checkpoints: {cfg.checkpoint_url}")
    return results


def new_run_hint(cfg: Config) -> str:
    """How to start a new run instead: where checkpoint.url is set it, not the name, says where
    the run's checkpoints are."""
    if cfg.checkpoint.url:
        return "start a new run with name=NEW_NAME and a new checkpoint.url"
    return "start a new run with name=NEW_NAME"


def find_checkpoint(cfg: Config, store: CheckpointStore, world_size: int) -> SavedRun | None:
    """The checkpoint to resume from, or None. Refuses to mix two runs in one folder, and a
    resume whose config does not fit the checkpoint (RESUME_MAY_CHANGE says what may change;
    the global batch is chosen next, the data checked once the loaders are built)."""
    checkpoints = store.list()
    previous = checkpoints or (cfg.run_dir / "metrics.jsonl").exists()
    if cfg.resume == "never":
        if previous:
            where = f"checkpoint.url={cfg.checkpoint.url}" if cfg.checkpoint.url and \
                checkpoints else f"run folder {cfg.run_dir}"
            raise UserError(f"{where} already holds a run; pass resume=auto to continue it, or "
                            f"{new_run_hint(cfg)}")
        return None
    saved = SavedRun.latest(store, world_size)
    if saved is None:
        if previous:
            log.warning("resume=auto: no valid checkpoint in %s; starting from scratch",
                        store.url)
        return None
    if saved.config is None:
        log.warning("checkpoint %s records no config (an older version wrote it): resuming "
                    "without checking that the config still fits", saved.where)
        return saved
    old_name = saved.config.get("name", cfg.name)
    if cfg.checkpoint.url and old_name != cfg.name:
        raise UserError(f"checkpoint.url={cfg.checkpoint.url} holds run {old_name!r}, and this "
                        f"is name={cfg.name!r}: set name={old_name} to continue that run, or a new "
                        "checkpoint.url to start this one")
    refused, accepted = classify_resume_changes(saved.config, cfg.to_dict())
    if refused:
        raise UserError(f"cannot resume {saved.where} with a different run: "
                        f"{'; '.join(refused)}. Undo these changes, or {new_run_hint(cfg)}")
    if accepted:
        log.info("resuming %s with changes: %s", saved.where, "; ".join(accepted))
    return saved


def choose_global_batch(cfg: Config, saved: SavedRun | None, world_size: int) -> int:
    """The run's global batch, part of its recipe: train.global_batch when set; unset, the
    checkpoint's when resuming (gradient accumulation makes it up on fewer processes), else
    data.batch_size x processes. An explicit one other than the checkpoint's needs
    train.allow_batch_change (a flag left in a config never changes the batch by itself)."""
    before = saved.global_batch if saved is not None else None
    if not cfg.train.global_batch:
        return before or cfg.data.batch_size * world_size
    own = cfg.train.global_batch
    if before is None or own == before:
        return own
    if not cfg.train.allow_batch_change:
        raise UserError(f"checkpoint {saved.where} was trained with a global batch of {before}; "
                        f"train.global_batch={own} would change it: leave train.global_batch "
                        f"unset (0) to keep the run's own, or set train.allow_batch_change=true "
                        f"to go on with {own}")
    log.warning("resuming %s with a global batch of %d instead of %d (train.allow_batch_change): "
                "the lr is scaled to it, the schedule goes on by epochs", saved.where, own, before)
    return own


def check_same_data(cfg: Config, saved: SavedRun, data: DataIdentity) -> None:
    """Refuse to resume on another data set than the checkpoint's (data.root may move, not
    change): other classes always (labels are positions in the class list), other training
    images unless data.allow_sample_change. Checkpoints of older versions record none."""
    allow = cfg.data.allow_sample_change
    where = saved.where
    try:
        recorded = saved.dataset
    except ValueError as e:
        unreadable = f"checkpoint {where} records its data set in a form this code does not " \
                     f"read (meta.dataset {e})"
        if not allow:
            raise UserError(f"{unreadable}: set data.allow_sample_change=true to resume "
                            f"without checking its data, or {new_run_hint(cfg)}") from e
        log.warning("%s: resuming without checking its data (data.allow_sample_change)",
                    unreadable)
        return
    if recorded is None:
        log.warning("checkpoint %s records no data set (an older version wrote it): resuming "
                    "without checking that data.root holds the data it was trained on", where)
        return
    change = data.class_change(recorded)
    if change:
        raise UserError(f"cannot resume {where} on data.root={cfg.data.root}: its class folders "
                        f"are not the checkpoint's ({change}); labels are positions in the "
                        "sorted class list and would no longer mean what the model learned "
                        "(data.allow_sample_change cannot allow this): point data.root at the "
                        f"data set the run was trained on, or {new_run_hint(cfg)}")
    change = data.sample_change(recorded)
    if change and not allow:
        raise UserError(f"cannot resume {where} on data.root={cfg.data.root}: its training "
                        f"images are not the checkpoint's ({change}); point data.root at the "
                        "checkpoint's data, or set data.allow_sample_change=true to go on with "
                        "these (the epoch goes on at its position in their new order)")
    if change:
        log.warning("resuming %s on other training images (data.allow_sample_change): %s; the "
                    "epoch goes on at its position in their new order", where, change)


def make_run_dir(cfg: Config) -> None:
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {cfg.run_dir}: {e.strerror or e}; set "
                        "out_dir= to a writable folder") from e


def record_config(cfg: Config, resumed: SavedRun | None) -> None:
    """The run folder keeps the config the run started with (config.yaml); each resume's config
    is recorded beside it in resumes/, so the folder tells what every part of the run used.

    A new run whose folder cannot be written stops here, in one line, before any training. A
    resume (a requeued job, say, onto a full disk) trains on with a warning: every checkpoint
    it saves records its config."""
    path = cfg.run_dir / "config.yaml"
    if resumed is not None and path.exists():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = cfg.run_dir / "resumes" / f"{stamp}-{resumed.name}.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    except OSError as e:
        if resumed is not None:
            log.warning("cannot record this resume's config in %s: %s; training goes on (its "
                        "checkpoints record the config)", path, e.strerror or e)
            return
        raise UserError(f"cannot write the run folder {cfg.run_dir}: {e.strerror or e}; set "
                        "out_dir= to a writable folder") from e


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = importlib.metadata.version("anytime-pipeline")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version
