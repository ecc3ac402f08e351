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
from pipeline.config import Config, DataConfig, classify_resume_changes
from pipeline.data import Loader, build_loader, position_from_step
from pipeline.data.index import DataIdentity
from pipeline.distributed import DistInfo, any_rank, mean_over_ranks, run_on_main
from pipeline.errors import TrainingDiverged, UserError
from pipeline.job import open_job
from pipeline.models import create_anytime_model, exit_costs, weights_mismatch
from pipeline.report import format_duration, format_table, plot_anytime_curve
from pipeline.storage.atomic import write_atomically
from pipeline.storage.checkpoints import CheckpointInfo, CheckpointStore
from pipeline.storage.lease import LeaseUnsupportedError, RunLease
from pipeline.train.checkpointing import Checkpointer
from pipeline.train.preemption import watch_preemption
from pipeline.train.progress import MetricsWriter, Progress
from pipeline.train.state import RunState, seed_everything
from pipeline.train.step import TrainStep

log = logging.getLogger("pipeline.train")


def train(cfg: Config,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` to the end (or continue it, with resume=auto); returns the final results.

    `on_epoch_end`, when given, is called on every rank after each validation with the epoch,
    step and per-exit errors (a launcher reports them to its scheduler, e.g. Ray Train)."""
    preemption = watch_preemption()  # first: a signal during set-up still exits EXIT_PREEMPTED
    started = time.perf_counter()
    if cfg.data.dtype == "float16" and cfg.train.amp == "none":  # fp16 images, fp32 weights
        raise UserError("data.dtype=float16 needs mixed precision: set train.amp=bf16 or fp16, "
                        "or data.dtype=float32")

    with ExitStack() as teardown:  # runs last to first, however the run ends
        job = teardown.enter_context(open_job(cfg.train.device, cfg.train.amp))
        device, dist_info, autocast = job.device, job.dist, job.autocast
        seed_everything(cfg.seed + dist_info.rank)
        teardown.callback(preemption.restore)
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
        per_pass, passes = cfg.batch_geometry(dist_info.world_size)
        if passes > 1 and per_pass < cfg.data.batch_size // 2:
            log.warning("train.global_batch=%d on %d processes: %d passes of only %d images per "
                        "step (data.batch_size=%d would fit); a global batch that is a multiple "
                        "of %d keeps the passes full", cfg.train.global_batch,
                        dist_info.world_size, passes, per_pass, cfg.data.batch_size,
                        dist_info.world_size * cfg.data.batch_size)
        train_loader = build_loader(replace(cfg.data, batch_size=per_pass), "train", train=True,
                                    rank=dist_info.rank, world_size=dist_info.world_size,
                                    seed=cfg.seed, accumulation=passes)
        val_loader = build_loader(cfg.data, "val", train=False, rank=dist_info.rank,
                                  world_size=dist_info.world_size, seed=cfg.seed)
        global_batch = train_loader.global_batch
        batch_text = f"{global_batch} ({per_pass} x {dist_info.world_size} processes" + \
            (f" x {passes} passes)" if passes > 1 else ")")
        resume_from = check_run_folder(cfg, store, global_batch, batch_text,
                                       dist_info.world_size,
                                       train_loader.identity)  # (info, state) or None
        run_on_main(lambda: record_config(cfg, resume_from[0] if resume_from else None))
        num_classes = cfg.model.num_classes or len(train_loader.classes)

        model = create_anytime_model(cfg, num_classes).to(device)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        criterion = build_loss(cfg, model.num_exits).to(device)

        optimizer = build_optimizer(cfg, model, global_batch)
        steps_per_epoch = train_loader.steps_per_epoch
        if cfg.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        run = RunState(model, optimizer, scaler, criterion, train_loader, rank=dist_info.rank,
                       seed=cfg.seed)

        if resume_from is not None:
            info, state = resume_from
            mismatch = weights_mismatch(model, state["model"])
            if mismatch:  # other classes, from a checkpoint that did not record its data
                raise UserError(f"checkpoint {store.url}/{info.name} does not fit this run's "
                                f"model ({mismatch}), with {num_classes} classes in data.root; "
                                "resume on the data set it was trained on, or start a new run "
                                "with name=NEW_NAME")
            if "data" not in state:
                state["data"] = data_position_from_step(info, state, train_loader.num_samples,
                                                        dist_info.world_size)
            run.load_state_dict(state)
            log.info("resumed from %s/%s at epoch %d, step %d", store.url, info.name, run.epoch,
                     run.step)
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
        checkpointer = Checkpointer(store, writer=dist_info.is_main, lease=lease,
                                    async_save=cfg.checkpoint.async_save,
                                    max_failed_saves=cfg.checkpoint.max_failed_saves)
        teardown.callback(checkpointer.close)

        # What every checkpoint of this start says of the run (the data: check_same_data)
        run_meta = {"config": cfg.to_dict(), "world_size": dist_info.world_size,
                    "global_batch": global_batch, "code_version": code_version()}
        if train_loader.identity is not None:
            run_meta["dataset"] = train_loader.identity.to_meta()

        def save(end_of_epoch: bool, blocking: bool = False) -> None:
            stop_if_diverged(loss, model, run.step, device)  # never a non-finite checkpoint
            meta = {"epoch": run.epoch, "end_of_epoch": end_of_epoch, **run_meta}
            checkpointer.save(run.step, run.state_dict(), meta, blocking=blocking)

        if preemption.requested(run.step, device, every=1):  # signalled while setting up
            log.warning("%s (%s) before the first step: nothing new to save; exiting",
                        preemption.stopped_as, preemption.signal_name)
            return preemption.result(cfg.name, run.step)
        loss = torch.zeros(())  # the last step's loss, checked before each save
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
                    save(end_of_epoch=False, blocking=True)
                    log.warning("%s (%s): checkpoint at step %d saved; exiting",
                                preemption.stopped_as, preemption.signal_name, run.step)
                    if dist_info.world_size > 1:  # no rank exits before the checkpoint is
                        torch.distributed.barrier()  # written: a launcher may kill the rest
                    return preemption.result(cfg.name, run.step)
                every = cfg.checkpoint.every_steps
                if every and run.step % every == 0 and train_loader.steps_done < steps_per_epoch:
                    save(end_of_epoch=False)
            run.epoch += 1
            train_loader.set_epoch(run.epoch)

            val_errors = evaluate(model, val_loader, device, memory_format, autocast)
            metrics.write("val", run.step, {"epoch": run.epoch, "top1": val_errors["top1"],
                                            "top5": val_errors["top5"],
                                            "weights": criterion.weights,
                                            "bad_images": len(train_loader.bad_files)})
            log.info("epoch %d/%d  val top-1 error per exit: %s", run.epoch, cfg.train.epochs,
                     " ".join(f"{e:.2f}" for e in val_errors["top1"]))
            save(end_of_epoch=True, blocking=run.epoch == cfg.train.epochs)
            if on_epoch_end is not None:
                on_epoch_end({"epoch": run.epoch, "step": run.step, "top1": val_errors["top1"],
                              "top5": val_errors["top5"]})

        checkpointer.wait()  # the last save is written, or the run fails here
        if val_errors is None:  # resumed a finished run: report it again
            val_errors = evaluate(model, val_loader, device, memory_format, autocast)
        return report(cfg, model, val_errors, time.perf_counter() - started, dist_info,
                      run.step)


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


def build_loss(cfg: Config, num_exits: int) -> AnytimeLoss:
    return AnytimeLoss(
        num_exits, cfg.loss.scheme, opt_exit=cfg.loss.opt_exit,
        alternating=cfg.loss.alternating, alternating_rule=cfg.loss.alternating_rule,
        sum_rand_ratio=cfg.loss.sum_rand_ratio, seed=cfg.seed,
        adaloss_update_every=cfg.loss.adaloss_update_every,
        adaloss_momentum=cfg.loss.adaloss_momentum, adaloss_gamma=cfg.loss.adaloss_gamma,
        adaloss_final_boost=cfg.loss.adaloss_final_boost,
    )


def build_optimizer(cfg: Config, model: torch.nn.Module,
                    global_batch: int) -> torch.optim.Optimizer:
    """timm's optimizer factory; `optim.lr` is for a global batch of 256, scaled linearly."""
    return create_optimizer_v2(
        model, opt=cfg.optim.name, lr=cfg.optim.lr * global_batch / 256,
        weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
    )


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> Scheduler:
    """timm's scheduler, updated every step (`step_update`), with epochs given in the config."""
    sched = {"cosine": "cosine", "step": "multistep"}[cfg.schedule.name]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=cfg.train.epochs,
        decay_milestones=cfg.schedule.decay_epochs, decay_rate=cfg.schedule.decay_rate,
        warmup_epochs=cfg.schedule.warmup_epochs, warmup_lr=cfg.schedule.warmup_lr,
        min_lr=cfg.schedule.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
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


def check_run_folder(cfg: Config, store: CheckpointStore, global_batch: int, batch_text: str,
                     world_size: int,
                     data: DataIdentity | None = None) -> tuple[CheckpointInfo, dict] | None:
    """The checkpoint to resume from and its state, or None. Refuses to mix two runs in one
    folder, and a resume whose config, global batch or data (`data`: the training split's
    identity, None for synthetic data) does not fit the checkpoint (another number of ranks is
    fine: the data position and the global batch carry over)."""
    previous = store.list() or (cfg.run_dir / "metrics.jsonl").exists()
    if cfg.resume == "never":
        if previous:
            raise UserError(f"run folder {cfg.run_dir} already holds a run; pass resume=auto to "
                            f"continue it, or name=NEW_NAME to start a new one")
        return None
    latest = store.load_latest_valid(problem_of=missing_run_state)
    if latest is None:
        if previous:
            log.warning("resume=auto: no valid checkpoint in %s; starting from scratch",
                        store.url)
        return None
    info, state = latest
    where = f"{store.url}/{info.name}"
    saved = info.meta.get("config")
    if isinstance(saved, dict):
        refused, accepted = classify_resume_changes(saved, cfg.to_dict())
        if refused:
            raise UserError(f"cannot resume {where} with a different run: {'; '.join(refused)}. "
                            "Undo these changes, or start a new run with name=NEW_NAME")
        if accepted:
            log.info("resuming %s with changes: %s", where, "; ".join(accepted))
    else:
        log.warning("checkpoint %s records no config (an older version wrote it): resuming "
                    "without checking that the config still fits", where)
    saved_batch = saved_global_batch(info, state, world_size)
    if saved_batch is not None and saved_batch != global_batch:
        if not cfg.train.allow_batch_change:
            raise UserError(
                f"checkpoint {where} was trained with a global batch of {saved_batch} and this "
                f"job's is {batch_text}: set train.global_batch={saved_batch} to keep it "
                f"(gradient accumulation makes up the difference), or "
                f"train.allow_batch_change=true to go on with {global_batch}")
        log.warning("resuming %s with a global batch of %d instead of %d "
                    "(train.allow_batch_change): the lr is scaled to it, the schedule goes on "
                    "by epochs", where, global_batch, saved_batch)
    if data is not None:
        check_same_data(cfg, info, data, where)
    return latest


def check_same_data(cfg: Config, info: CheckpointInfo, data: DataIdentity, where: str) -> None:
    """Refuse to resume on another data set than the checkpoint's (data.root may move, not
    change): other classes always (labels are positions in the class list), other training
    images unless data.allow_sample_change. Checkpoints of older versions record none."""
    allow = cfg.data.allow_sample_change
    if "dataset" not in info.meta:
        log.warning("checkpoint %s records no data set (an older version wrote it): resuming "
                    "without checking that data.root holds the data it was trained on", where)
        return
    try:
        saved = DataIdentity.from_meta(info.meta["dataset"])
    except ValueError as e:
        unreadable = f"checkpoint {where} records its data set in a form this code does not " \
                     f"read (meta.dataset {e})"
        if not allow:
            raise UserError(f"{unreadable}: set data.allow_sample_change=true to resume "
                            "without checking its data, or start a new run with "
                            "name=NEW_NAME") from e
        log.warning("%s: resuming without checking its data (data.allow_sample_change)",
                    unreadable)
        return
    change = data.class_change(saved)
    if change:
        raise UserError(f"cannot resume {where} on data.root={cfg.data.root}: its class folders "
                        f"are not the checkpoint's ({change}); labels are positions in the "
                        "sorted class list and would no longer mean what the model learned "
                        "(data.allow_sample_change cannot allow this): point data.root at the "
                        "data set the run was trained on, or start a new run with name=NEW_NAME")
    change = data.sample_change(saved)
    if change and not allow:
        raise UserError(f"cannot resume {where} on data.root={cfg.data.root}: its training "
                        f"images are not the checkpoint's ({change}); point data.root at the "
                        "checkpoint's data, or set data.allow_sample_change=true to go on with "
                        "these (the epoch goes on at its position in their new order)")
    if change:
        log.warning("resuming %s on other training images (data.allow_sample_change): %s; the "
                    "epoch goes on at its position in their new order", where, change)


def saved_world_size(info: CheckpointInfo, state: dict, world_size: int) -> int:
    """The number of ranks that wrote the checkpoint: its meta, else one random state per rank;
    the oldest checkpoints say neither, and resumed on the job's own number (`world_size`)."""
    if "world_size" in info.meta:
        return info.meta["world_size"]
    return len(state["rng"]) if isinstance(state.get("rng"), list) else world_size


def saved_global_batch(info: CheckpointInfo, state: dict, world_size: int) -> int | None:
    """The global batch the checkpoint was trained with; None where it does not say."""
    if "global_batch" in info.meta:
        return info.meta["global_batch"]
    config = info.meta.get("config")
    if not isinstance(config, dict):
        return None
    batch_size = config.get("data", {}).get("batch_size", DataConfig.batch_size)
    return batch_size * saved_world_size(info, state, world_size)


def data_position_from_step(info: CheckpointInfo, state: dict, num_samples: int,
                            world_size: int) -> dict:
    """The data position of a checkpoint written before checkpoints held it: from its step, in
    the geometry of the run that wrote it, as that version resumed."""
    config = info.meta.get("config") if isinstance(info.meta.get("config"), dict) else {}
    world_size = saved_world_size(info, state, world_size)
    batch_size = config.get("data", {}).get("batch_size", DataConfig.batch_size)
    max_steps = config.get("train", {}).get("max_steps_per_epoch", 0)
    log.info("checkpoint %s holds no data position (an older version wrote it): epoch %d goes "
             "on from step %d, as %d ranks x %d images per step", info.name, state["epoch"],
             state["step"], world_size, batch_size)
    return position_from_step(state["step"], epoch=state["epoch"], num_samples=num_samples,
                              batch_size=batch_size, world_size=world_size,
                              max_steps_per_epoch=max_steps)


# What a checkpoint must hold to resume from ("data" came later: older ones get it from the step).
RUN_STATE = tuple(key for key in RunState.KEYS if key != "data")


def missing_run_state(state: dict) -> str | None:
    """What a verified payload lacks to resume a run from (another tool's file, say)."""
    if not isinstance(state, dict):
        return f"its payload is a {type(state).__name__}, not a run's state"
    missing = [key for key in RUN_STATE if key not in state]
    return f"its state lacks {', '.join(missing)}" if missing else None


def make_run_dir(cfg: Config) -> None:
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {cfg.run_dir}: {e.strerror or e}; set "
                        "out_dir= to a writable folder") from e


def record_config(cfg: Config, resumed: CheckpointInfo | None) -> None:
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
