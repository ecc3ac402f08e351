"""The run lease's errors: each one line naming the holder or the storage, and the fix."""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.storage.retry import StorageError


class LeaseHeldError(UserError):
    """Another live process holds the run's lease; the one-line message names it and the fix."""


class LeaseLockTimeoutError(LeaseHeldError):
    """The local lease's lock stayed held past its bound: a process holding it is stopped (or
    hung) inside a compare-and-swap. One line naming the lock, its holder's pid and the fix."""


class LeaseUnsupportedError(UserError):
    """The storage has no atomic create-if-absent that the lease can use."""


class LeaseLostError(UserError):
    """This process's lease was taken over (it was fenced): it must stop writing checkpoints."""


class LeaseStorageError(StorageError):
    """The lease object could not be read or written after every retry."""
