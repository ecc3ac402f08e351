"""Opening a URL (or a local path) as an fsspec file system, with a clear error."""

from __future__ import annotations

from typing import Any

from pipeline.errors import UserError


def open_url(url: str, endpoint_url: str = "", what: str = "URL",
             **options: Any) -> tuple[Any, str]:
    """(file system, path within it) for `url`: s3:// on AWS or on the S3-compatible server at
    `endpoint_url`, any other fsspec protocol, or a local path. `what` names the URL in the
    error ("data.root", "--out"); `options` go to the file system (s3fs: anon, config_kwargs)."""
    import fsspec

    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:  # fsspec's message names the missing package
        raise UserError(f"{what} {url!r} cannot be opened: {e} (for s3:// install the [s3] "
                        "extra: pip install 'anytime-pipeline[s3]')") from e


def single_attempt(url: str) -> dict[str, Any]:
    """File-system options under which each call to an s3:// store is one attempt, so that the
    caller's retry policy (pipeline/storage/retry.py) is the only one: botocore's and s3fs's
    own retries under it took ~5 s per call against a server that was down. A client of its
    own, so that other users of s3fs in the process keep theirs."""
    import fsspec

    if fsspec.core.split_protocol(url)[0] not in ("s3", "s3a"):
        return {}
    return {"skip_instance_cache": True,
            "config_kwargs": {"retries": {"total_max_attempts": 1}}}
