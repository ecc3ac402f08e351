"""CheckpointStore: checkpoints in any fsspec location (a local path, file://, s3://, gs://).

A checkpoint is a folder `<url>/step-<step>/` of payload objects plus `manifest.json`, written
last, that lists every payload with its size and sha256. A checkpoint exists only when its
manifest exists and every payload verifies, so a save cut short is never loaded; nothing is ever
overwritten. Payloads are read with `torch.load(weights_only=True)`: a checkpoint from a bucket
is untrusted input. Credentials come from the storage library's own chain (environment, config
files, instance roles), never from this project's configs.

    store = CheckpointStore("s3://bucket/runs/demo", keep_last=3)
    store.save(step, {"model": model.state_dict(), ...}, meta={"epoch": 1})
    ckpt = store.latest_valid()          # None when there is none
    state = store.load(ckpt)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT_VERSION = 1
T = TypeVar("T")


class StorageError(UserError):
    """Storage kept failing after every retry; the message names the URL, the last error and
    what to check. A UserError, so the CLI shows it as one line instead of a traceback."""


@dataclass
class CheckpointInfo:
    name: str  # folder name, e.g. "step-00000468"
    step: int
    meta: dict[str, Any]  # from the manifest: epoch, end_of_epoch, config, code version, ...
    size: int  # bytes of payload


class CheckpointStore:
    def __init__(
        self,
        url: str,
        *,
        keep_last: int = 3,
        keep_every_epochs: int = 0,
        endpoint_url: str = "",
        retries: int = 4,
        retry_delay: float = 1.0,
    ):
        self.url = url.rstrip("/")
        options = {"endpoint_url": endpoint_url} if endpoint_url else {}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as e:
            raise UserError(f"checkpoint URL {self.url!r} cannot be opened: {e} (for s3:// "
                            "install the [s3] extra: pip install 'anytime-pipeline[s3]')") from e
        self.keep_last = keep_last
        self.keep_every_epochs = keep_every_epochs
        self.retries = retries
        self.retry_delay = retry_delay

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Write `state` as checkpoint `step`; returns its folder name. Never overwrites one.

        Each storage call is retried with exponential backoff; StorageError when all fail.
        """
        name = f"step-{step:08d}"
        folder = f"{self.root}/{name}"
        if self._retry(lambda: self.fs.exists(f"{folder}/{MANIFEST}"), f"check {name}"):
            raise FileExistsError(f"checkpoint {self.url}/{name} exists already")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "files": {PAYLOAD: {"size": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}},
            "meta": meta or {},
        }
        self._retry(lambda: self.fs.makedirs(folder, exist_ok=True), f"create {name}")
        self._retry(lambda: self.fs.pipe_file(f"{folder}/{PAYLOAD}", payload), f"upload {name}")
        # The manifest goes last: its presence is what makes the checkpoint exist.
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        self._retry(lambda: self.fs.pipe_file(f"{folder}/{MANIFEST}", manifest_bytes),
                    f"commit {name}")
        try:
            self._apply_retention(keep=name)
        except Exception as e:  # a failed clean-up must not fail a good save
            log.warning("checkpoint retention in %s failed (will retry next save): %s", self.url, e)
        return name

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint with a readable manifest, oldest first (payloads not verified)."""
        infos = []
        for name in self._folders():
            manifest = self._manifest(name)
            if manifest is not None:
                size = sum(f["size"] for f in manifest["files"].values())
                infos.append(CheckpointInfo(name, manifest["step"], manifest["meta"], size))
        return sorted(infos, key=lambda info: info.step)

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint whose payloads verify; broken ones are skipped with a warning."""
        for info in reversed(self.list()):
            problem = self.verify(info)
            if problem is None:
                return info
            log.warning("skipping checkpoint %s/%s: %s", self.url, info.name, problem)
        return None

    def load_latest_valid(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[CheckpointInfo, dict] | None:
        """The newest checkpoint that verifies and its state, each payload read only once."""
        for info in reversed(self.list()):
            problem, files = self._read_verified(info.name)
            if problem is None:
                return info, self._deserialize(info, files, map_location)
            log.warning("skipping checkpoint %s/%s: %s", self.url, info.name, problem)
        return None

    def verify(self, info: CheckpointInfo) -> str | None:
        """None when every payload matches the manifest, else what is wrong."""
        return self._read_verified(info.name)[0]

    def load(self, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict:
        """Read and verify a checkpoint's state; raises UserError when it does not verify."""
        problem, files = self._read_verified(info.name)
        if problem is not None:
            raise UserError(f"checkpoint {self.url}/{info.name} is corrupt ({problem}); "
                            "delete it or resume from an earlier one")
        return self._deserialize(info, files, map_location)

    def _deserialize(self, info: CheckpointInfo, files: dict[str, bytes],
                     map_location: str | torch.device) -> dict:
        try:
            return torch.load(io.BytesIO(files[PAYLOAD]), map_location=map_location,
                              weights_only=True)
        except Exception as e:  # verified bytes that still are not a plain-tensor checkpoint
            raise UserError(f"checkpoint {self.url}/{info.name} holds objects that are not "
                            f"plain tensors and containers, refused for safety: {e}") from e

    def _read_verified(self, name: str) -> tuple[str | None, dict[str, bytes]]:
        manifest = self._manifest(name)
        if manifest is None:
            return "manifest missing or unreadable", {}
        files = {}
        for file, expected in manifest["files"].items():
            try:
                data = self._retry(lambda f=file: self.fs.cat_file(f"{self.root}/{name}/{f}"),
                                   f"read {name}/{file}")
            except FileNotFoundError:
                return f"{file} is missing", {}
            if len(data) != expected["size"]:
                return f"{file} has {len(data)} bytes, the manifest says {expected['size']}", {}
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                return f"{file} does not match its sha256", {}
            files[file] = data
        return None, files

    def _folders(self) -> list[str]:
        # Another process may have written since this one last listed (a resumed job).
        self.fs.invalidate_cache(self.root)
        if not self._retry(lambda: self.fs.exists(self.root), f"look at {self.url}"):
            return []
        entries = self._retry(lambda: self.fs.ls(self.root, detail=False), f"list {self.url}")
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [n for n in names if n.startswith("step-")]

    def _manifest(self, name: str) -> dict | None:
        try:
            raw = self._retry(lambda: self.fs.cat_file(f"{self.root}/{name}/{MANIFEST}"),
                              f"read {name}/{MANIFEST}")
            manifest = json.loads(raw)
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            return None
        return manifest

    def _apply_retention(self, keep: str) -> None:
        """Keep the newest `keep_last`, every `keep_every_epochs`-th epoch end and `keep` (the
        checkpoint just written, hence the newest valid one); delete the rest, and the folders
        of older saves that never committed."""
        if self.keep_last <= 0:
            return
        infos = self.list()
        committed = {info.name for info in infos}
        newest = infos[-1].step if infos else 0
        doomed = [info.name for info in infos[: -self.keep_last]
                  if info.name != keep and not self._epoch_kept(info)]
        doomed += [n for n in self._folders()
                   if n not in committed and int(n.split("-")[1]) < newest]
        for name in doomed:
            self._retry(lambda n=name: self.fs.rm(f"{self.root}/{n}", recursive=True),
                        f"delete {name}")

    def _epoch_kept(self, info: CheckpointInfo) -> bool:
        epoch = info.meta.get("epoch", 0)
        return (self.keep_every_epochs > 0 and info.meta.get("end_of_epoch", False)
                and epoch % self.keep_every_epochs == 0)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """`call()`, retried with exponential backoff on errors that may pass."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (FileNotFoundError, FileExistsError, PermissionError):
                raise  # answers, not outages
            except OSError as e:  # s3fs, gcsfs and local I/O errors all derive from OSError
                error = e
            except Exception as e:  # botocore / aiohttp errors that fsspec did not translate
                if "credential" in type(e).__name__.lower():
                    raise UserError(f"no credentials for {self.url}: {type(e).__name__}; set "
                                    "them the standard way (AWS_* variables, ~/.aws, a role)"
                                    ) from e
                error = e
            if attempt < self.retries:
                delay = self.retry_delay * 2**attempt
                log.warning("storage: %s failed (%s: %s); retry %d/%d in %.1fs", what,
                            type(error).__name__, error, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise StorageError(f"{what} at {self.url} failed {self.retries + 1} times; last error "
                           f"{type(error).__name__}: {error}; check that the storage is up and "
                           "reachable (checkpoint.endpoint_url) and its credentials")
