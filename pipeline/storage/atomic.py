"""Create a file or object only where none exists, whole, on any fsspec file system that can.

    create_only(fs, "bucket/run/step-00000020/manifest.json", data)   # FileExistsError if there

- Local paths: the bytes go to a temporary file beside the target, which is then hard-linked
  into place (`link_new`): the link fails when the name exists (like O_EXCL), and readers never
  see a half-written file. Where the file system has no hard links (FUSE-mounted buckets, some
  SMB shares) an exclusive create (O_EXCL) written in place.
- S3 (s3fs): a PUT with `If-None-Match: *`; the server refuses it with 412 when the key exists,
  judged when the upload completes, so a slow upload cannot replace a faster one.
- Elsewhere (gcsfs, ...) a plain write: the store has no create-only that fsspec exposes.

The run lease (lease/local.py) creates its local record with `link_new` and replaces it with
`write_temp` + `os.replace`; files of the run folder (config.yaml, results.json) are replaced
with `write_atomically`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import Any

# os.link's answers where the file system has no hard links
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


def protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local(fs: Any) -> bool:
    return bool({"file", "local"} & set(protocols(fs)))


def s3_code(error: BaseException) -> str:
    """The S3 error code behind an s3fs exception ('' when there is none)."""
    response = getattr(error.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def lost_race(error: BaseException) -> bool:
    """Whether an s3fs error is a conditional write that lost: 412 PreconditionFailed, or 409
    ConditionalRequestConflict when AWS saw concurrent conditional writes. (s3fs itself names a
    412 FileExistsError only when the server's error says which condition failed.)"""
    return s3_code(error) in ("PreconditionFailed", "ConditionalRequestConflict")


def write_temp(folder: str, name: str, data: bytes) -> str:
    """A new temporary file `.<name>.<random>.tmp` in `folder` holding `data`, on disk (fsync:
    a link or rename of it must never expose an empty file after a crash); returns its path.
    Nothing is left behind when it fails (a full disk)."""
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace the local file `path` with `data`: readers see the old file or the new one,
    never a part, and a failed write (a full disk) leaves the old one as it was."""
    path = os.fspath(path)
    tmp = write_temp(os.path.dirname(path) or ".", os.path.basename(path), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def link_new(path: str, data: bytes) -> None:
    """Create the local file `path` holding `data`, whole, or raise FileExistsError. An OSError
    with an errno in NO_HARD_LINKS says the file system cannot."""
    tmp = write_temp(os.path.dirname(path), os.path.basename(path), data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def create_only(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` unless something is there already: FileExistsError then."""
    if is_local(fs):
        try:
            link_new(path, data)
        except OSError as e:
            if isinstance(e, FileExistsError) or e.errno not in NO_HARD_LINKS:
                raise
            try:
                with open(path, "xb") as f:  # exclusive still; readers may see it being written
                    f.write(data)
            except FileExistsError:
                raise
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # ours: the exclusive create succeeded
                raise
    elif "s3" in protocols(fs):
        try:
            fs.pipe_file(path, data, mode="create")
        except OSError as e:
            if lost_race(e):
                raise FileExistsError(f"{path} exists") from e
            raise
    else:
        fs.pipe_file(path, data)
