"""Create a file or object only where none exists, whole, on any fsspec file system that can.

    create_only(fs, "bucket/run/step-00000020/manifest.json", data)   # FileExistsError if there

- Local paths: the bytes go to a temporary file beside the target, which is then hard-linked
  into place (`link_new`): the link fails when the name exists (like O_EXCL), and readers never
  see a half-written file. Where the file system has no hard links (FUSE-mounted buckets, some
  SMB shares) an exclusive create (O_EXCL) written in place.
- S3 (s3fs): a PUT with `If-None-Match: *`; the server refuses it with 412 when the key exists,
  judged when the upload completes, so a slow upload cannot replace a faster one.
- Elsewhere (gcsfs, ...) a plain write: the store has no create-only that fsspec exposes.

The run lease (lease.py) creates its local record with `link_new` and replaces it with
`write_temp` + `os.replace`.
"""

from __future__ import annotations

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


def write_temp(folder: str, name: str, data: bytes) -> str:
    """A new temporary file `.<name>.<random>.tmp` in `folder` holding `data`, on disk (fsync:
    a link or rename of it must never expose an empty file after a crash); returns its path."""
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


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
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
            with open(path, "xb") as f:  # exclusive still; readers may see it being written
                f.write(data)
    elif "s3" in protocols(fs):
        fs.pipe_file(path, data, mode="create")
    else:
        fs.pipe_file(path, data)
