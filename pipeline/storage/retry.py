"""One retry policy for every storage call (checkpoints and the run lease): exponential backoff on
errors that may pass, at once on answers that waiting cannot change. No torch import: the lease
runs in light processes too.

    data = retry_storage(lambda: fs.cat_file(path), "read manifest.json", url, retries=4,
                         delay=1.0, log=log)
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import UserError

T = TypeVar("T")

# Answers from the storage that no retry can change: the reason and the fix.
FINAL_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "give a writable checkpoint location"),
    errno.EACCES: ("permission denied", "check its permissions and credentials"),
    errno.EPERM: ("operation not permitted", "check its permissions and credentials"),
}


class StorageError(UserError):
    """Storage failed for good (after every retry, or with an answer that waiting cannot change);
    the message names the URL, the error and what to check. A UserError, so the CLI shows it as
    one line instead of a traceback."""


def retry_storage(call: Callable[[], T], what: str, where: str, *, retries: int, delay: float,
                  log: logging.Logger) -> T:
    """`call()`, retried with exponential backoff from `delay` seconds on errors that may pass.
    FileNotFoundError, FileExistsError and ValueError (a malformed answer) go to the caller as
    they are: they are answers the caller interprets, not outages."""
    error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return call()
        except OSError as e:  # s3fs, gcsfs and local I/O errors all derive from OSError
            final = FINAL_ERRNOS.get(e.errno or 0)
            if final is None and isinstance(e, PermissionError):
                final = FINAL_ERRNOS[errno.EACCES]
            if final is not None:
                reason, fix = final
                raise StorageError(f"{what} at {where} failed: {reason} "
                                   f"({type(e).__name__}: {e}); {fix}") from e
            if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError,
                              NotADirectoryError)):
                raise
            error = e
        except (ValueError, UserError):  # a malformed answer; a verdict the call made itself
            raise
        except Exception as e:  # botocore / aiohttp errors that fsspec did not translate
            if "credential" in type(e).__name__.lower():
                raise UserError(f"no credentials for {where}: {type(e).__name__}; set them the "
                                "standard way (AWS_* variables, ~/.aws, a role)") from e
            error = e
        if attempt < retries:
            wait = delay * 2**attempt
            log.warning("storage: %s failed (%s: %s); retry %d/%d in %.1fs", what,
                        type(error).__name__, error, attempt + 1, retries, wait)
            time.sleep(wait)
    raise StorageError(f"{what} at {where} failed {retries + 1} times; last error "
                       f"{type(error).__name__}: {error}; check that the storage is up and "
                       "reachable (checkpoint.endpoint_url) and its credentials")
