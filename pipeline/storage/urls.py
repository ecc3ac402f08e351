"""URLs and local paths: what one names (object storage or this machine; a shard manifest or a
folder), and opening one as an fsspec file system with a clear error, the one place that does,
so that every client gets its own endpoint and the same message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def is_remote(root: str | Path) -> bool:
    """Whether a path or URL is in object storage (any fsspec protocol but file://) rather than
    on this machine's file system."""
    return "://" in str(root) and not str(root).startswith("file://")


def is_manifest(root: str | Path) -> bool:
    """Whether data.root names the manifest of tar shards (shards.json) rather than an
    ImageNet-layout folder."""
    return str(root).rstrip("/").endswith(".json")


def open_url(url: str, endpoint_url: str = "", what: str = "URL", *,
             single_attempt: bool = False, **options: Any) -> tuple[Any, str]:
    """(file system, path within it) for `url`: s3:// on AWS or on the S3-compatible server at
    `endpoint_url`, any other fsspec protocol, or a local path. `what` names the setting in the
    error ("data.root", "--out"); `options` go to the file system (s3fs: anon, config_kwargs).

    single_attempt=True: each call to an s3:// store is one attempt, so that the caller's retry
    policy (pipeline/storage/retry.py) is the only one: botocore's and s3fs's own retries under
    it took ~5 s per call against a server that was down. The client is one of its own, so that
    other users of s3fs in the process keep their retries."""
    import fsspec

    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    s3 = fsspec.core.split_protocol(url)[0] in ("s3", "s3a")
    if single_attempt and s3:
        options["skip_instance_cache"] = True
        options["config_kwargs"] = {**options.get("config_kwargs", {}),
                                    "retries": {"total_max_attempts": 1}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:  # fsspec's message names the missing package
        raise UserError(f"{what} {url!r} cannot be opened: {e} (for s3:// install the [s3] "
                        "extra: pip install 'anytime-pipeline[s3]')") from e
    if single_attempt and s3:
        fs.retries = 1  # s3fs's own loop around botocore's: one try too
    return fs, path
