"""The lease record, one JSON object `<checkpoint url>/lease.json`:

    {"version": 1, "token": "<uuid4 of this acquisition>", "renewed": <wall time, s>,
     "ttl": <s>, "holder": {"host", "pid", "pid_namespace", "boot_id", "slurm_job_id",
                            "slurm_restart_count", "ray_job_id", "started": "<UTC ISO time>"}}

(CheckpointStore lists only `step-*` folders, so the lease beside them is invisible to it.)

Clock assumption: expiry compares wall clocks (time.time()) of different hosts, so the hosts'
clocks must agree to within a small fraction of the ttl (NTP gives milliseconds; ttl is minutes).
A clock behind by more than the ttl makes its live holder look expired: it is taken over, then
fenced. A clock far ahead, and records no clock can judge, follow these rules:
- Every field the rules use is checked when the record is read (`decode`): `renewed` and `ttl`
  finite numbers (not booleans), ttl > 0; the holder's pid a positive integer, its
  slurm_restart_count a non-negative integer, its host, boot_id, pid_namespace, slurm_job_id,
  ray_job_id and started strings. Anything else is not a lease this version writes: acquire
  refuses it in one line naming the field (delete it if no job is running).
- A ttl longer than MAX_TTL (3600 s) counts as MAX_TTL when its expiry is judged, and the config
  accepts no longer checkpoint.lease_ttl, so no record makes anyone wait more than an hour.
- A record dated ahead of this host's clock by more than its ttl (its host's clock far ahead, or
  a bogus value such as 1e12) is judged by whether it changes, not by clocks: RunLease watches
  it (run_lease.py).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from typing import Any

from pipeline.storage.manifest import is_int, shown

LEASE = "lease.json"  # the record's name in the checkpoint location
FORMAT_VERSION = 1
MAX_TTL = 3600.0  # s: the longest ttl a record's expiry is judged by (checkpoint.lease_ttl's bound)


def encode(token: str, renewed: float, ttl: float, holder: dict[str, Any]) -> bytes:
    return json.dumps({"version": FORMAT_VERSION, "token": token, "renewed": renewed,
                       "ttl": ttl, "holder": holder}, indent=1).encode()


def decode(data: bytes) -> dict[str, Any]:
    """The lease record in `data`; ValueError naming the field unless every field the rules use
    has the type and range `encode` writes (the location's content is not trusted to be ours)."""
    try:
        record = json.loads(data)
    except RecursionError as e:
        raise ValueError(f"not a lease record: nested too deeply: {data[:200]!r}") from e
    version = record.get("version") if isinstance(record, dict) else None
    if not is_int(version) or version != FORMAT_VERSION:
        raise ValueError(f"not a version-{FORMAT_VERSION} lease: {data[:200]!r}")
    if not isinstance(record.get("token"), str) or not isinstance(record.get("holder"), dict):
        raise ValueError(f"not a lease record (token, holder, renewed, ttl): {data[:200]!r}")
    for name in ("renewed", "ttl"):
        if not _is_finite(record.get(name)):
            raise ValueError(f"{name} is {shown(record.get(name))}, not a finite number of "
                             "seconds")
    if record["ttl"] <= 0:
        raise ValueError(f"ttl is {shown(record['ttl'])}, not a positive number of seconds")
    holder = record["holder"]
    if "pid" in holder and not (is_int(holder["pid"]) and 0 < holder["pid"] < 2**31):
        raise ValueError(f"holder.pid is {shown(holder['pid'])}, not a process id")
    count = holder.get("slurm_restart_count", 0)
    if not (is_int(count) and count >= 0):
        raise ValueError(f"holder.slurm_restart_count is {shown(count)}, not a whole number "
                         ">= 0")
    for name in ("host", "boot_id", "pid_namespace", "slurm_job_id", "ray_job_id", "started"):
        if not isinstance(holder.get(name, ""), str):
            raise ValueError(f"holder.{name} is {shown(holder[name])}, not a string")
    return record


def _is_finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def judged_ttl(record: dict[str, Any]) -> float:
    """The ttl the record's expiry is judged by: its own, at most MAX_TTL."""
    return min(float(record["ttl"]), MAX_TTL)


def expires(record: dict[str, Any]) -> float:
    return record["renewed"] + judged_ttl(record)


def ahead(record: dict[str, Any], now: float) -> float:
    """How far the record's `renewed` lies ahead of `now`, when that is more than its ttl
    (then its expiry cannot be judged by clocks); else 0."""
    span = record["renewed"] - now
    return span if span > judged_ttl(record) else 0.0


def iso(t: float) -> str:
    """A wall time as UTC ISO text; any number, also one that is no date (1e300, NaN)."""
    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
            timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds(t)} after 1970 (not a date)"


def seconds(s: float) -> str:
    """A span as `86400 s`; `1e+12 s` where whole digits would fill a line."""
    return f"{s:.0f} s" if abs(s) < 1e9 else f"{s:.3g} s"


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """One line naming a record's holder, its heartbeat and its expiry."""
    who = record["holder"]
    jobs = []
    if who.get("slurm_job_id"):
        jobs.append(f"SLURM job {who['slurm_job_id']} "
                    f"(restart {who.get('slurm_restart_count', 0)})")
    if who.get("ray_job_id"):
        jobs.append(f"Ray job {who['ray_job_id']}")
    text = f"pid {who.get('pid')} on host {who.get('host')}"
    if jobs:
        text += ", " + ", ".join(jobs)
    text += f", since {who.get('started')}"
    text = text.replace("\r", "\\r").replace("\n", "\\n")  # the record is not ours to trust
    now = time.time() if now is None else now
    if ahead(record, now):  # no expiry to promise
        return text + (f", last heartbeat dated {seconds(ahead(record, now))} ahead of this "
                       "host's clock")
    age, expiry = now - record["renewed"], expires(record)
    text += (f", last heartbeat {seconds(age)} ago" if age >= 0 else
             f", last heartbeat dated {seconds(-age)} ahead of this host's clock")
    text += f", expires at {iso(expiry)} (in {seconds(max(0.0, expiry - now))})"
    if record["ttl"] > MAX_TTL:
        text += f" (its ttl {seconds(record['ttl'])} counted as {seconds(MAX_TTL)})"
    return text
