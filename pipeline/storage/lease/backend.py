"""The storage under a lease: conditional operations on the one lease object, for a local path
(local.py) or S3 (s3.py)."""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.storage.atomic import is_local, protocols
from pipeline.storage.lease.errors import LeaseUnsupportedError
from pipeline.storage.lease.local import LocalBackend
from pipeline.storage.lease.s3 import S3Backend


class Backend(Protocol):
    """A version identifies one write of the object (S3: its ETag; local: the md5 of its bytes,
    which differ per write: token and time)."""

    where: str  # the object, for messages

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(record, version), or None when there is no lease."""

    def create(self, data: bytes) -> str | None:
        """Write only if absent; the new version, None if it exists."""

    def swap(self, data: bytes, version: str) -> str | None:
        """Replace the object only if it is still `version` (a takeover, or a renewal by its
        holder); the new version, else None."""

    def delete(self, version: str) -> bool:
        """Delete only if it is still `version`; False if it is not."""


def backend_for(fs: Any, root: str, url: str, lock_timeout: float) -> Backend:
    """The lease's storage at `root` of `fs` (the checkpoint location `url`); `lock_timeout`:
    the longest wait for a local lease's lock."""
    if is_local(fs):
        return LocalBackend(root, lock_timeout)
    if "s3" in protocols(fs):
        return S3Backend(fs, root)
    # Other stores need their own conditional writes (gcsfs: if_generation_match).
    raise LeaseUnsupportedError(
        f"run lease at {url!r}: only local paths and s3:// support the atomic create the lease "
        "needs; use one of those for checkpoint.url")
