"""Ray Train entry: the project's trainer, unchanged, in every worker of a TorchTrainer.

    python -m launchers.ray_train --config configs/ilsvrc_msdnet26_sieve.yaml \\
        --num-workers 16 --gpus --max-failures 3 \\
        checkpoint.url=s3://bucket/runs/msdnet26/checkpoints data.root=/datasets/imagenet

Run it on a node of a Ray cluster (it joins the cluster named by --address or RAY_ADDRESS, or
the one `ray start` runs on this machine), through Ray Jobs (`python -m launchers.ray_submit`),
or on a laptop, where it starts a local Ray instance.

Checkpoint design: the project's CheckpointStore is the one source of truth, exactly as under
SLURM. Every worker runs `pipeline.train.trainer.train(cfg)` with resume=auto; rank 0 writes
verified checkpoints (every epoch, and every `checkpoint.every_steps` steps) to
`checkpoint.url`. Ray's part is the worker group: TorchTrainer places the workers, sets
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR and initialises torch.distributed (which
`pipeline.distributed` then finds initialised and joins), and on a worker failure
FailureConfig(max_failures) restarts the whole group, whose trainers resume from the newest
valid checkpoint, mid-epoch and at the same data position. Ray checkpoints are not used: they
would copy the same state a second time, resume only at report() boundaries (epoch ends), and
lose the manifest verification and retention the store gives. Ray still gets each epoch's
validation errors through `ray.train.report`, so its dashboard and `Result.metrics` show them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_from_dict, load_config
from pipeline.errors import UserError, cli_main
from pipeline.storage.checkpoints import CheckpointStore

log = logging.getLogger("launchers.ray_train")

RAY_RUN_NAME = "ray"  # Ray's own run folder, next to the step-* checkpoints


def train_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the project's trainer, reporting epochs to Ray."""
    import ray.train

    from pipeline.train.trainer import train

    # Ray's worker logging has a console handler on the root logger; ours only set the level.
    logging.getLogger("pipeline").setLevel(logging.INFO)
    context = ray.train.get_context()
    log.info("ray train worker rank %d/%d (local rank %d) pid %d on %s",
             context.get_world_rank(), context.get_world_size(), context.get_local_rank(),
             os.getpid(), socket.gethostname())
    train(config_from_dict(loop_config["config"]), on_epoch_end=report_epoch)


def report_epoch(values: dict[str, Any]) -> None:
    """Per-epoch validation errors to Ray (every rank calls it: report is a barrier)."""
    import ray.train

    top1 = values["top1"]
    ray.train.report({"epoch": values["epoch"], "step": values["step"],
                      "final_exit_top1_error": top1[-1],
                      "mean_exit_top1_error": sum(top1) / len(top1),
                      "top1_error_per_exit": top1, "top5_error_per_exit": values["top5"]})


def for_ray(cfg: Config) -> Config:
    """The config every worker gets: resume=auto (a restarted group must continue, not refuse
    its own run folder) and local paths made absolute (workers may run in another directory)."""
    cfg = copy.deepcopy(cfg)
    cfg.resume = "auto"
    cfg.out_dir = str(Path(cfg.out_dir).absolute())
    if "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).absolute())
    if cfg.checkpoint.url and "://" not in cfg.checkpoint.url:
        cfg.checkpoint.url = str(Path(cfg.checkpoint.url).absolute())
    return cfg


def ray_storage(storage_url: str, endpoint_url: str = "") -> tuple[str, Any]:
    """Ray's RunConfig(storage_path, storage_filesystem) for a path or any fsspec URL.

    Remote URLs go through fsspec, like the checkpoints: the same endpoint and credentials."""
    if "://" not in storage_url or storage_url.startswith("file://"):
        return str(Path(storage_url.removeprefix("file://")).absolute()), None
    import pyarrow.fs

    from pipeline.storage.urls import open_url

    fs, path = open_url(storage_url, endpoint_url, "Ray storage (--storage-path or checkpoint.url)")
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: Config, *, num_workers: int | tuple[int, int], use_gpu: bool = False,
                  cpus_per_worker: float = 1.0, max_failures: int = 3,
                  storage_url: str = "") -> Any:
    """A TorchTrainer running `train_worker` on `num_workers` workers (one per GPU), or on
    between MIN and MAX of them, (MIN, MAX): Ray's elastic group, which shrinks when nodes are
    lost and grows back when they return; the trainer keeps the global batch across sizes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    check_worker_counts(cfg, num_workers)
    if use_gpu and cfg.train.device == "cpu":
        raise UserError("--gpus with train.device=cpu: drop --gpus or use train.device=auto")
    if not use_gpu and cfg.train.device == "cuda":
        raise UserError("train.device=cuda needs --gpus (Ray gives GPUs only to workers that "
                        "ask for them)")
    cfg = for_ray(cfg)
    storage_path, storage_fs = ray_storage(storage_url or cfg.checkpoint_url,
                                           cfg.checkpoint.endpoint_url)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )


def check_worker_counts(cfg: Config, num_workers: int | tuple[int, int]) -> None:
    low, high = num_workers if isinstance(num_workers, tuple) else (num_workers, num_workers)
    if low < 1:
        raise UserError(f"--num-workers {low}: need at least one worker")
    if low == high:
        return
    total = cfg.train.global_batch
    if not total:
        raise UserError(f"--num-workers {low}-{high} lets Ray change the group's size, which "
                        f"would change the global batch: set train.global_batch (e.g. "
                        f"{cfg.data.batch_size * high}, data.batch_size x {high})")
    odd = [n for n in range(low, high + 1) if total % n]
    if odd:
        raise UserError(f"train.global_batch={total} does not split over "
                        f"{' or '.join(map(str, odd))} workers, sizes --num-workers {low}-{high} "
                        "allows; choose a range whose every size divides it")


def worker_count(text: str) -> int | tuple[int, int]:
    """--num-workers: N, or MIN-MAX for an elastic group."""
    low, sep, high = text.partition("-")
    try:
        counts = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or MIN-MAX, e.g. 2 or 1-4") from None
    if not 1 <= counts[0] <= counts[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return counts if sep else counts[0]


def run(cfg: Config, **trainer_options: Any) -> Any:
    """Fit on the Ray cluster this process is connected to; returns Ray's Result.

    A failure that is the user's (UserError in the workers, e.g. a missing data folder) comes
    back as that UserError, so the CLI prints one line."""
    import ray.train

    # Ray Train sends the workers' print() through its logger and, since Ray wraps stdout,
    # prints it as well: the trainer's results table would show twice. Workers inherit this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = build_trainer(cfg, **trainer_options)
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        user_error = find_user_error(e)
        if user_error is not None:
            # its own type: a diverged run exits 3 here too (a requeue must not retry it)
            raise type(user_error)(f"{user_error} (on a Ray Train worker)") from e
        raise


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the run (a WorkerGroupError holds
    each failed worker's own exception in `worker_failures`)."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, UserError):
            return failure
    return None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a Ray Train run (shared with launchers.ray_submit, which passes them on)."""
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/*.yaml")
    parser.add_argument("--num-workers", type=worker_count,
                        default=os.environ.get("NUM_WORKERS", "2"),
                        help="training processes: one per GPU with --gpus (env NUM_WORKERS; 2); "
                             "MIN-MAX: an elastic group, which Ray shrinks when nodes are lost "
                             "and grows when they return (needs train.global_batch)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs Ray reserves per worker (data loading); default 1")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts before the run fails (-1: no limit)")
    parser.add_argument("--storage-path", default="",
                        help="where Ray keeps its run state (default: the checkpoint URL; "
                             "Ray's folder is <url>/ray)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides: train.epochs=3")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launchers.ray_train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--address", default=None,
                        help="Ray cluster, e.g. auto or 10.0.0.1:6379 (default: RAY_ADDRESS, "
                             "else a local Ray instance)")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        import ray
    except ImportError as e:
        raise UserError("Ray is not installed: pip install 'anytime-pipeline[ray]'") from e
    cfg = for_ray(load_config(args.config, args.overrides))
    try:
        ray.init(address=args.address)
    except ConnectionError as e:
        raise UserError(f"no Ray cluster at --address {args.address} ({e}); start one with "
                        "`ray start --head`, or leave --address out for a local one") from e
    try:
        run(cfg, num_workers=args.num_workers, use_gpu=args.gpus,
            cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
            storage_url=args.storage_path)
    finally:
        ray.shutdown()  # also lets the workers' last log lines through before ours
    store = CheckpointStore(cfg.checkpoint_url, endpoint_url=cfg.checkpoint.endpoint_url)
    final = store.latest_valid()
    where = f"{store.url}/{final.name} (epoch {final.meta.get('epoch')})" if final else "none"
    ray_folder = f"{(args.storage_path or cfg.checkpoint_url).rstrip('/')}/{RAY_RUN_NAME}"
    print(f"ray train run {cfg.name} finished; newest checkpoint: {where}; "
          f"ray run folder: {ray_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
