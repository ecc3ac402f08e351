"""Who holds a lease (host, pid, SLURM and Ray job), and when a holder is provably gone, so that
its lease may be taken over before it expires."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from typing import Any

from pipeline.storage.lease.record import MAX_TTL, expires, seconds


def holder_identity() -> dict[str, Any]:
    """Who this process is, as stored in the lease: host, pid, SLURM and Ray job, start time."""
    env = os.environ
    slurm_job = env.get("SLURM_JOB_ID", "")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        # An array task's own SLURM_JOB_ID is unique too, but users know it as JOB_TASK.
        slurm_job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "boot_id": _boot_id(),
        "slurm_job_id": slurm_job,
        "slurm_restart_count": _restart_count(env.get("SLURM_RESTART_COUNT", "")),
        "ray_job_id": env.get("RAY_JOB_ID", "") or _ray_job_id(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def takeover_reason(old: dict[str, Any], mine: dict[str, Any], now: float) -> str | None:
    """Why the lease record `old` may be taken over now by the holder `mine`, or None when its
    holder may be alive."""
    expiry = expires(old)
    if now > expiry:
        counted = (f" (its ttl {seconds(old['ttl'])} counted as {seconds(MAX_TTL)})"
                   if old["ttl"] > MAX_TTL else "")
        return f"it expired {now - expiry:.1f} s ago{counted}"
    theirs = old["holder"]
    # A process of this machine (same boot, same pid namespace) that is gone cannot write any
    # more: a job that was SIGKILLed or crashed, then started again here, goes on at once.
    # (Ray job ids are not used: they are counters that repeat across clusters.)
    if (mine["boot_id"] and theirs.get("boot_id") == mine["boot_id"]
            and theirs.get("host") == mine["host"]
            and theirs.get("pid_namespace", "") == mine["pid_namespace"]
            and theirs.get("pid") != mine["pid"]
            and "pid" in theirs and not _pid_alive(theirs["pid"])):
        return f"its process {theirs.get('pid')} on this host has exited"
    # SLURM stops every task of a job before requeueing it: a higher restart count of the same
    # job means the old writer is gone. (The same restart count proves nothing: two trainers in
    # one salloc share the job id and may both be alive.)
    if (theirs.get("slurm_job_id") and theirs["slurm_job_id"] == mine["slurm_job_id"]
            and mine["slurm_restart_count"] > theirs.get("slurm_restart_count", 0)):
        return (f"SLURM job {mine['slurm_job_id']} was requeued (restart "
                f"{theirs.get('slurm_restart_count', 0)} -> {mine['slurm_restart_count']})")
    return None


def _restart_count(text: str) -> int:
    # SLURM sets a count; anything else counts as 0, which never takes over on its own.
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def _ray_job_id() -> str:
    # Only when this process already runs Ray: importing ray just to ask would cost seconds.
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except Exception:  # an old or partial Ray: the id is only informative
        pass
    return ""


def _boot_id() -> str:
    # Host names and the initial pid namespace's inode repeat across machines; the kernel's
    # boot id does not.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    # Containers on one machine may share a hostname; a pid is only meaningful in its namespace.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
