"""The run lease: one writer per run, a small lease object beside the checkpoints.

    run_lease.py   RunLease: acquire, heartbeat, check (fencing), release; the protocol
    record.py      the lease.json record: its format, checks, expiry and clock rules
    holder.py      who holds a lease, and when a holder is provably gone
    backend.py     conditional create / swap / delete, for
    local.py         a local or shared file system (link + flock)
    s3.py            S3 (If-None-Match / If-Match)
    errors.py      LeaseHeldError, LeaseLostError, ...
"""

from pipeline.storage.lease.errors import (
    LeaseHeldError,
    LeaseLockTimeoutError,
    LeaseLostError,
    LeaseStorageError,
    LeaseUnsupportedError,
)
from pipeline.storage.lease.run_lease import RunLease

__all__ = ["LeaseHeldError", "LeaseLockTimeoutError", "LeaseLostError", "LeaseStorageError",
           "LeaseUnsupportedError", "RunLease"]
