"""Submit a training run to SLURM through submitit; preempted or timed-out jobs requeue themselves
and resume from their newest checkpoint.

    python -m launchers.submitit_train --config configs/ilsvrc_msdnet26_sieve.yaml \\
        --nodes 2 --gpus-per-node 4 --partition gpu --timeout 1440 data.root=/datasets/imagenet

How a preemption goes (one design for sbatch and submitit, see docs/launch_submitit.md):
SLURM sends SIGUSR1 to every task (`--signal=USR1@<delay>` before the time limit, or `scancel
--signal=USR1`); the trainer finishes its step, rank 0 writes a synchronous checkpoint, and
train() returns `preempted`. Rank 0 then hands over to submitit's own preemption handler, which
calls `TrainJob.checkpoint()` (the resubmission: the same call) and runs `scontrol requeue`. The
requeued job calls the same TrainJob again, whose resume=auto finds the checkpoint.
submitit's default signal is USR2; it is set to USR1 here, the trainer's and the sbatch scripts'.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import UserError, cli_main

try:  # an optional extra: the CLI says how to install it when it is missing
    from submitit.helpers import Checkpointable
except ImportError:
    Checkpointable = object

REPO = Path(__file__).resolve().parents[1]
PREEMPT_SIGNAL = "USR1"  # what pipeline/train/preemption.py acts on
log = logging.getLogger("launchers.submitit")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as e:
        raise UserError("submitit is not installed: pip install 'anytime-pipeline[slurm]'") from e
    return submitit


class TrainJob(Checkpointable):
    """The callable submitit pickles and runs in every task: `TrainJob()(config, overrides)`."""

    def checkpoint(self, config: str, overrides: list[str]) -> Any:
        """submitit's handler calls this on rank 0 before it requeues the job: the resubmission
        is the same call, because the trainer keeps all its state in the CheckpointStore and
        resume=auto picks it up."""
        return _submitit().helpers.DelayedSubmission(TrainJob(), config, overrides)

    def __call__(self, config: str, overrides: list[str]) -> dict[str, Any]:
        submitit = _submitit()
        log_to_stdout("pipeline", "launchers")  # not the root logger: submitit has its own
        from pipeline.config import load_config
        from pipeline.train.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
        from pipeline.train.trainer import train

        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for torch.distributed's env://. All
        # GPUs of the node stay visible; the trainer picks cuda:LOCAL_RANK.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False)
        env = submitit.JobEnvironment()
        log.info("submitit job %s, task %d of %d, restart %s", env.job_id, dist_env.rank,
                 dist_env.world_size, os.environ.get("SLURM_RESTART_COUNT", "0"))
        cfg = load_config(config, [*overrides, "resume=auto"])
        # submitit installed its checkpoint-and-requeue handler on the preemption signal; the
        # trainer replaces it while it trains, so keep it to hand over to once the save is done.
        requeue = signal.getsignal(getattr(signal, f"SIG{PREEMPT_SIGNAL}"))
        results = train(cfg)
        if results.get("interrupted"):  # SIGINT: a person stopped it, not a scheduler
            raise SystemExit(EXIT_INTERRUPTED)
        if not results.get("preempted"):
            return results
        if dist_env.rank == 0:
            if not callable(requeue) or "requeue" not in getattr(requeue, "__name__", ""):
                raise UserError(f"submitit's handler is not on SIG{PREEMPT_SIGNAL}; submit "
                                "with launchers.submitit_train, which sets it")
            # Calls self.checkpoint(), runs `scontrol requeue` and exits; or raises when the
            # job may not requeue (too many timeouts), which submitit records as the result.
            requeue(getattr(signal, f"SIG{PREEMPT_SIGNAL}"), None)
        # Other ranks leave without a result: the requeue restarts every task.
        raise SystemExit(EXIT_PREEMPTED)


def log_to_stdout(*names: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def submit_training(config: str, overrides: list[str], *, folder: str | Path,
                    nodes: int = 1, gpus_per_node: int = 0, cpus_per_task: int = 1,
                    partition: str = "", timeout_min: int = 60, signal_delay_s: int = 120,
                    max_num_timeout: int = 10, name: str = "", slurm_setup: list[str] = (),
                    ) -> Any:
    """Submit `python -m pipeline train --config config overrides...` as one SLURM job with one
    task per GPU (one task per node without GPUs); returns the submitit Job."""
    submitit = _submitit()
    from pipeline.config import load_config

    cfg = load_config(config, [*overrides, "resume=auto"])  # fail here, not in the queue
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a SLURM login node (or put SLURM's "
                        "client commands on PATH)")
    tasks_per_node = max(gpus_per_node, 1)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                     slurm_max_num_timeout=max_num_timeout)
    params: dict[str, Any] = dict(
        name=name or cfg.name, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task, timeout_min=timeout_min,
        slurm_signal_delay_s=signal_delay_s,
        slurm_additional_parameters={"signal": f"{PREEMPT_SIGNAL}@{signal_delay_s}"},
        # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05.
        slurm_srun_args=[f"--cpus-per-task={cpus_per_task}"],
        # The job's Python imports this checkout and installs submitit's handler on USR1.
        slurm_setup=[f"cd {shlex.quote(str(REPO))}",
                     f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
                     f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}",
                     f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cpus_per_task}}}",
                     *slurm_setup],
    )
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor.submit(TrainJob(), str(Path(config).resolve()), list(overrides))


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.submitit_train",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/*.yaml")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="one process per GPU; 0 = one CPU process per node")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    parser.add_argument("--timeout", type=int, default=24 * 60,
                        help="time limit in minutes; the job requeues itself before it")
    parser.add_argument("--signal-delay", type=int, default=300,
                        help="seconds before the time limit that SIGUSR1 is sent")
    parser.add_argument("--folder", default="slurm/logs/submitit/%j",
                        help="submitit's folder for pickles and logs (%%j = job id)")
    parser.add_argument("--wait", action="store_true",
                        help="stay until the run ends (across requeues) and print its results")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides: data.root=...")
    args = parser.parse_args(argv)
    job = submit_training(args.config, args.overrides, folder=args.folder, nodes=args.nodes,
                          gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                          partition=args.partition, timeout_min=args.timeout,
                          signal_delay_s=args.signal_delay)
    print(f"submitted job {job.job_id}; log: {job.paths.stdout}")
    print(f"watch: squeue -j {job.job_id}; tail -f {job.paths.stdout}")
    if args.wait:
        results = job.result()
        print(f"done: {results.get('name')} in {results.get('seconds', 0):.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
