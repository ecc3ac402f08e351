"""Create an object only where none exists, on any fsspec file system that can say so.

    create_only(fs, "bucket/run/step-00000020/manifest.json", data)   # FileExistsError if there

- Local paths: the bytes go to a temporary file beside the target, which is then hard-linked into
  place: the link fails when the name exists (like O_EXCL) and readers never see a half-written
  file.
- S3 (s3fs): a PUT with `If-None-Match: *`; the server refuses it with 412 when the key exists,
  judged when the upload completes, so a slow upload cannot overwrite a faster one.
- Elsewhere (gcsfs, ...) a plain write: the store has no create-only that fsspec exposes.
"""

from __future__ import annotations

import os
import uuid
from typing import Any


def protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def create_only(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` unless something is there already: FileExistsError then."""
    kinds = protocols(fs)
    if "file" in kinds or "local" in kinds:
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the link must never expose an empty file after a crash
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    elif "s3" in kinds:
        fs.pipe_file(path, data, mode="create")
    else:
        fs.pipe_file(path, data)
