"""The EANN artifact: one safetensors file holding every member's weights and, in its header's
metadata, the JSON description (schedule, costs, validation errors, members' configs).

safetensors is a length-prefixed JSON header plus raw tensor bytes: reading it runs no code
(no pickle at all), so an artifact from a bucket is safe to open. A copy of the JSON is written
beside it as `eann.json` for people and tools; loading needs only the .safetensors file.

    url = write_artifact("s3://bucket/eann/r3", tensors, info, endpoint_url=...)
    tensors, info = read_artifact("s3://bucket/eann/r3")  # the folder or the .safetensors file
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.errors import UserError
from pipeline.storage.urls import open_url

ARTIFACT = "eann.safetensors"
DESCRIPTION = "eann.json"
FORMAT = "anytime-pipeline-eann/1"


def write_artifact(url: str, tensors: dict[str, torch.Tensor], info: dict[str, Any], *,
                   endpoint_url: str = "", extra_files: dict[str, Path] | None = None) -> str:
    """Write `<url>/eann.safetensors` (+ eann.json and `extra_files`, e.g. plots); returns the
    artifact's URL. The artifact appears whole or not at all: on object stores one PUT is
    atomic, on file systems it is written under a temporary name and renamed."""
    fs, root = open_url(url.rstrip("/"), endpoint_url, "EANN folder (--out)")
    description = json.dumps(info, indent=1)
    payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                               metadata={"format": FORMAT, "eann": description})
    try:
        fs.makedirs(root, exist_ok=True)
        _put(fs, f"{root}/{ARTIFACT}", payload)
        _put(fs, f"{root}/{DESCRIPTION}", description.encode())
        for name, path in (extra_files or {}).items():
            _put(fs, f"{root}/{name}", Path(path).read_bytes())
    except (OSError, PermissionError) as e:
        raise UserError(f"cannot write the EANN to {url}: {type(e).__name__}: {e}; check the "
                        "URL, its permissions and, for S3, --endpoint-url and credentials") from e
    return f"{url.rstrip('/')}/{ARTIFACT}"


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if "file" in fs.protocol or "local" in fs.protocol:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)  # a rename within one folder: atomic on POSIX
    else:
        fs.pipe_file(path, data)


def read_artifact(url: str, endpoint_url: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and description of the artifact at `url` (its folder or the file itself)."""
    url = url.rstrip("/")
    if not url.endswith(".safetensors"):
        url = f"{url}/{ARTIFACT}"
    fs, path = open_url(url, endpoint_url, "EANN artifact")
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise UserError(f"no EANN artifact at {url}; build one with `python -m pipeline "
                        "assemble --members ... --val DIR --out URL`") from e
    except OSError as e:
        raise UserError(f"cannot read {url}: {type(e).__name__}: {e}") from e
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{url} is not a readable safetensors file ({e}); it is truncated or "
                        "corrupt: assemble it again") from e
    if metadata.get("format") != FORMAT:
        raise UserError(f"{url} is not an EANN artifact of this pipeline (format "
                        f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, json.loads(metadata["eann"])
