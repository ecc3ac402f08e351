"""Submit a training run to a running Ray cluster as a Ray Job, print its id, follow its log.

    python -m launchers.ray_submit --address http://HEAD:8265 \\
        --config configs/ilsvrc_msdnet26_sieve.yaml --num-workers 16 --gpus \\
        checkpoint.url=s3://bucket/runs/msdnet26/checkpoints data.root=/datasets/imagenet

It does what `ray job submit --working-dir . -- python -m launchers.ray_train ...` does, through
Ray's JobSubmissionClient, after checking the config here first (a bad key fails now, not on
the cluster). The working directory (this checkout, without what .gitignore lists) is uploaded
and the job's driver runs `launchers.ray_train` in it. Relative local paths in the config
(out_dir, data.root, a local checkpoint.url) are made absolute here, because the job runs in a
copy of the working directory: they are right for a cluster on this machine or on a shared
file system; elsewhere give paths that exist on the nodes, or s3:// URLs.

Exit code: 0 when the job succeeded, 1 when it failed or was stopped, 2 for a bad config or
address; with --no-wait, 0 once the job is submitted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from launchers.ray_train import add_train_arguments, check_worker_counts, for_ray
from pipeline.config import load_config
from pipeline.errors import UserError, cli_main

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launchers.ray_submit", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""),
                        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                             "(default: RAY_ADDRESS)")
    parser.add_argument("--working-dir", type=Path, default=Path("."),
                        help="folder uploaded for the job: this checkout (default .)")
    parser.add_argument("--submission-id", default=None,
                        help="job id to use (default: Ray picks one)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return; do not follow the log")
    add_train_arguments(parser)
    return parser.parse_args(argv)


def entrypoint(args: argparse.Namespace, working_dir: Path) -> str:
    """The job's command line: launchers.ray_train with the config relative to the working dir
    and local paths made absolute (see the module docstring)."""
    config = Path(args.config).resolve()
    if not config.is_relative_to(working_dir):
        raise UserError(f"--config {args.config} is outside --working-dir {working_dir}: the job "
                        "only sees the working dir; copy the config into it (e.g. configs/)")
    cfg = for_ray(load_config(config, args.overrides))  # a bad config fails here, not remotely
    check_worker_counts(cfg, args.num_workers)
    paths = [f"out_dir={cfg.out_dir}", f"data.root={cfg.data.root}"]
    if cfg.checkpoint.url:
        paths.append(f"checkpoint.url={cfg.checkpoint.url}")
    command = ["python", "-m", "launchers.ray_train",
               "--config", str(config.relative_to(working_dir)),
               "--num-workers", "-".join(map(str, args.num_workers))
               if isinstance(args.num_workers, tuple) else str(args.num_workers),
               "--cpus-per-worker", str(args.cpus_per_worker),
               "--max-failures", str(args.max_failures)]
    if args.gpus:
        command.append("--gpus")
    if args.storage_path:
        command += ["--storage-path", args.storage_path]
    return shlex.join([*command, *args.overrides, *paths])


def submit(args: argparse.Namespace) -> tuple[JobSubmissionClient, str]:
    """Submit the job; returns (client, job id)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not args.address:
        raise UserError("no Ray cluster given: pass --address http://HEAD:8265 (the dashboard "
                        "of `ray start --head`) or set RAY_ADDRESS")
    working_dir = args.working_dir.resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir} is not a folder")
    command = entrypoint(args, working_dir)
    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(entrypoint=command, submission_id=args.submission_id,
                                   runtime_env={"working_dir": str(working_dir)})
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {args.address} ({e}); is `ray start "
                        "--head` running there, with its dashboard on that port?") from e
    except AuthenticationError as e:
        raise UserError(f"the Ray cluster at {args.address} uses token authentication: export "
                        "RAY_AUTH_MODE=token and give its token in ~/.ray/auth_token, "
                        "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from e
    print(f"submitted Ray job {job_id} to {args.address}: {command}", flush=True)
    print(f"watch: ray job logs {job_id} --address {args.address} --follow; "
          f"stop: ray job stop {job_id} --address {args.address}", flush=True)
    return client, job_id


async def follow(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for_end(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """The job's final status (tail_job_logs can end a moment before the status is set)."""
    from ray.job_submission import JobStatus

    while (status := client.get_job_status(job_id)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1.0)
    return status


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray.job_submission  # noqa: F401
    except ImportError as e:
        raise UserError("Ray Jobs is not installed: pip install 'anytime-pipeline[ray]'") from e
    client, job_id = submit(args)
    if args.no_wait:
        return 0
    try:
        asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on", file=sys.stderr)
        return 0
    status = wait_for_end(client, job_id)
    print(f"Ray job {job_id} {status.value}", flush=True)
    return 0 if status.value == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
