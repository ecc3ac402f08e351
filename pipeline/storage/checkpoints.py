"""CheckpointStore: checkpoints in any fsspec location (a local path, file://, s3://, gs://).

A checkpoint is a folder `<url>/step-<step>/` of payload objects plus `manifest.json`, written
last, that lists every payload with its size and sha256. A checkpoint exists only when its
manifest exists and every payload verifies, so a save cut short is never loaded. Payloads are
read with `torch.load(weights_only=True)`: a checkpoint from a bucket is untrusted input.

    store = CheckpointStore("runs/demo/checkpoints", keep_last=3)
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
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    name: str  # folder name, e.g. "step-00000468"
    step: int
    meta: dict[str, Any]  # from the manifest: epoch, config, time, ...
    size: int  # bytes of payload


class CheckpointStore:
    def __init__(self, url: str, keep_last: int = 3):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.keep_last = keep_last

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Write `state` as checkpoint `step`; returns its folder name. Never overwrites one."""
        name = f"step-{step:08d}"
        folder = f"{self.root}/{name}"
        if self.fs.exists(f"{folder}/{MANIFEST}"):
            raise FileExistsError(f"checkpoint {self.url}/{name} exists already")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        self.fs.makedirs(folder, exist_ok=True)
        self.fs.pipe_file(f"{folder}/{PAYLOAD}", payload)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "files": {PAYLOAD: {"size": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}},
            "meta": meta or {},
        }
        # The manifest goes last: its presence is what makes the checkpoint exist.
        self.fs.pipe_file(f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        self._apply_retention()
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

    def verify(self, info: CheckpointInfo) -> str | None:
        """None when every payload matches the manifest, else what is wrong."""
        return self._read_verified(info.name)[0]

    def load(self, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict:
        """Read and verify a checkpoint's state; raises UserError when it does not verify."""
        problem, files = self._read_verified(info.name)
        if problem is not None:
            raise UserError(f"checkpoint {self.url}/{info.name} is corrupt ({problem}); "
                            "delete it or resume from an earlier one")
        return torch.load(io.BytesIO(files[PAYLOAD]), map_location=map_location, weights_only=True)

    def _read_verified(self, name: str) -> tuple[str | None, dict[str, bytes]]:
        manifest = self._manifest(name)
        if manifest is None:
            return "manifest missing or unreadable", {}
        files = {}
        for file, expected in manifest["files"].items():
            try:
                data = self.fs.cat_file(f"{self.root}/{name}/{file}")
            except FileNotFoundError:
                return f"{file} is missing", {}
            if len(data) != expected["size"]:
                return f"{file} has {len(data)} bytes, the manifest says {expected['size']}", {}
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                return f"{file} does not match its sha256", {}
            files[file] = data
        return None, files

    def _folders(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        entries = self.fs.ls(self.root, detail=False)
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                if e.rstrip("/").rsplit("/", 1)[-1].startswith("step-")]

    def _manifest(self, name: str) -> dict | None:
        try:
            manifest = json.loads(self.fs.cat_file(f"{self.root}/{name}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            return None
        return manifest

    def _apply_retention(self) -> None:
        """Keep the newest `keep_last` checkpoints; never delete the one just written."""
        if self.keep_last <= 0:
            return
        for info in self.list()[: -self.keep_last]:
            self.fs.rm(f"{self.root}/{info.name}", recursive=True)
