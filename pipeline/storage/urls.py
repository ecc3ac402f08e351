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
