"""CheckpointStore: checkpoints in any fsspec location (a local path, file://, s3://, gs://).

A checkpoint is a folder `<url>/step-<step>/` of payload objects plus `manifest.json`, written
last, that lists every payload with its size and sha256 (manifest.py). A bucket's content is
untrusted input, so a checkpoint is valid only when its manifest has exactly the shape this code
writes, every payload matches it, and every payload loads with `torch.load(weights_only=True)`.
Anything else is broken, whatever the reason, and shown as such, never as a traceback: `list()`
reports every `step-*` folder with its `problem` (manifests only), `verify()` also reads the
payloads, `latest_valid()` / `load_latest_valid()` skip broken ones with a warning and fall back
to older ones, and `load()` of a broken one is a UserError naming it and why.

Nothing is overwritten in place, and only retention deletes: a folder in the way of a new save at
its step (a resumed run writing again the step of a broken checkpoint) is moved aside to
`<url>/quarantine/step-<step>.<UTC time>/` and kept there for a person to look at; a save that
fails removes its own partial folder. Storage calls are retried with backoff, except when the
answer cannot change by waiting (no space, quota, read-only, permission). Credentials come from
the storage library's own chain (environment, config files, instance roles), never from this
project's configs.

    store = CheckpointStore("s3://bucket/runs/demo", keep_last=3)
    store.save(step, {"model": model.state_dict(), ...}, meta={"epoch": 1})
    ckpt = store.latest_valid()          # None when there is none
    state = store.load(ckpt)
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
import torch

from pipeline.errors import UserError
from pipeline.storage.manifest import (
    MANIFEST,
    PAYLOAD,
    Manifest,
    ManifestError,
    build,
    folder_name,
    folder_step,
    parse,
)
from pipeline.storage.retry import StorageError, retry_storage

__all__ = ["MANIFEST", "PAYLOAD", "CheckpointInfo", "CheckpointStore", "StorageError"]

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # <url>/quarantine/: folders moved out of a new save's way
NO_MANIFEST = f"{MANIFEST} is missing (a save that did not finish?)"
T = TypeVar("T")

# Answers about the storage itself: waiting does not change them, so they are not retried.
@dataclass
class CheckpointInfo:
    name: str  # folder name, e.g. "step-00000468"
    step: int  # from the folder name; -1 for a `step-*` name without a number
    meta: dict[str, Any]  # from the manifest: epoch, end_of_epoch, config, code version, ...
    size: int  # bytes of payload
    problem: str | None = None  # why it is broken; None = fine as far as checked


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

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None, *,
             may_write: Callable[[], None] | None = None) -> str:
        """Write `state` as checkpoint `step`; returns its folder name. A folder already there
        is moved to quarantine first, never overwritten; a failed save removes its own folder.

        `may_write()`, when given, raises if this process may no longer write (a lost lease):
        it is asked before anything is moved and again right before the commit, so a fenced
        writer never commits, and never touches a folder another writer may own by then.
        Each storage call is retried with exponential backoff; StorageError when all fail.
        """
        name = folder_name(step)
        folder = f"{self.root}/{name}"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        manifest = build(step, {PAYLOAD: payload}, meta or {})
        if may_write is not None:
            may_write()
        self._move_aside(name)
        try:
            self._retry(lambda: self.fs.makedirs(folder, exist_ok=True), f"create {name}")
            self._retry(lambda: self.fs.pipe_file(f"{folder}/{PAYLOAD}", payload),
                        f"upload {name}")
        except Exception:
            self._remove_partial(name)
            raise
        if may_write is not None:
            may_write()  # raising here leaves the folder alone: it may be another writer's now
        try:
            # The manifest goes last: its presence is what makes the checkpoint exist.
            self._retry(lambda: self.fs.pipe_file(f"{folder}/{MANIFEST}", manifest),
                        f"commit {name}")
        except Exception:
            self._remove_partial(name)
            raise
        try:
            self._apply_retention(keep=name)
        except Exception as e:  # a failed clean-up must not fail a good save
            log.warning("checkpoint retention in %s failed (will retry next save): %s", self.url, e)
        return name

    def list(self) -> list[CheckpointInfo]:
        """Every `step-*` folder, oldest first, broken ones with their `problem`; only manifests
        are read (`verify` reads the payloads)."""
        infos = [self._inspect(name)[0] for name in self._folders()]
        return sorted(infos, key=lambda info: (info.step, info.name))

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies; broken ones are skipped with a warning."""
        for info in reversed(self.list()):
            problem = self.verify(info)
            if problem is None:
                return info
            self._warn_skipped(info.name, problem)
        return None

    def load_latest_valid(
        self, map_location: str | torch.device = "cpu",
        problem_of: Callable[[dict], str | None] | None = None,
    ) -> tuple[CheckpointInfo, dict] | None:
        """The newest checkpoint that verifies and its state, each payload read only once.
        `problem_of(state)`, when given, says what the caller finds wrong with a state that
        verifies (None: fine); such a checkpoint is skipped like a broken one."""
        for info in reversed(self.list()):
            problem, state = self._read(info.name, map_location)
            if problem is None and problem_of is not None:
                problem = problem_of(state)
            if problem is None:
                return info, state
            self._warn_skipped(info.name, problem)
        return None

    def verify(self, info: CheckpointInfo) -> str | None:
        """None when the manifest is sound and every payload matches it and loads as plain
        tensors and containers, else what is wrong."""
        return self._read(info.name, "cpu")[0]

    def load(self, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict:
        """Read and verify a checkpoint's state; raises UserError when it is broken."""
        problem, state = self._read(info.name, map_location)
        if problem is not None:
            raise UserError(f"checkpoint {self.url}/{info.name} is broken: {problem}; use an "
                            f"earlier one (`python -m pipeline checkpoints verify {self.url}`)")
        return state

    def _warn_skipped(self, name: str, problem: str) -> None:
        log.warning("skipping broken checkpoint %s/%s: %s", self.url, name, problem)

    def _inspect(self, name: str) -> tuple[CheckpointInfo, Manifest | None]:
        """The folder `name` as far as its manifest tells; storage failures propagate (they say
        nothing about the checkpoint)."""
        step = folder_step(name)
        if step is None:
            return CheckpointInfo(name, -1, {}, 0, "not a checkpoint folder name "
                                                   "(step-<number>)"), None
        try:
            raw = self._retry(lambda: self.fs.cat_file(f"{self.root}/{name}/{MANIFEST}"),
                              f"read {name}/{MANIFEST}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return CheckpointInfo(name, step, {}, 0, NO_MANIFEST), None
        try:
            manifest = parse(raw, step)
        except ManifestError as e:
            return CheckpointInfo(name, step, {}, 0, str(e)), None
        return CheckpointInfo(name, step, manifest.meta, manifest.size), manifest

    def _read(self, name: str,
              map_location: str | torch.device) -> tuple[str | None, dict | None]:
        """(None, the state) when checkpoint `name` is valid, else (what is wrong, None)."""
        info, manifest = self._inspect(name)
        if manifest is None:
            return info.problem, None
        loaded = {}
        for file, expected in manifest.files.items():
            try:
                data = self._retry(lambda f=file: self.fs.cat_file(f"{self.root}/{name}/{f}"),
                                   f"read {name}/{file}")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return f"{file} is missing", None
            if len(data) != expected.size:
                return f"{file} has {len(data)} bytes, the manifest says {expected.size}", None
            if hashlib.sha256(data).hexdigest() != expected.sha256:
                return f"{file} does not match its sha256", None
            try:
                loaded[file] = torch.load(io.BytesIO(data), map_location=map_location,
                                          weights_only=True)
            except Exception as e:  # bytes as written, but not a plain-tensor checkpoint
                return (f"{file} refused by torch.load(weights_only=True): {_essential(e)} (a "
                        "bucket's content is untrusted: only tensors and plain containers are "
                        "loaded)"), None
        return None, loaded[PAYLOAD]

    def _folders(self) -> list[str]:
        # Another process may have written since this one last listed (a resumed job).
        self.fs.invalidate_cache(self.root)
        if not self._retry(lambda: self.fs.exists(self.root), f"look at {self.url}"):
            return []
        entries = self._retry(lambda: self.fs.ls(self.root, detail=False), f"list {self.url}")
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [n for n in names if n.startswith("step-")]

    def _move_aside(self, name: str) -> None:
        """Move folder `name` (broken, or a save the run makes again) to quarantine, so the new
        save neither mixes with nor destroys it. Copy every object, then delete the folder: that
        is what a move is on S3, and s3fs's recursive `mv` trips over the folder's own name."""
        folder = f"{self.root}/{name}"
        self.fs.invalidate_cache(self.root)
        if not self._retry(lambda: self.fs.exists(folder), f"check {name}"):
            return
        problem = (self._inspect(name)[0].problem
                   or "its manifest is sound; this run writes the step again")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = f"{QUARANTINE}/{name}.{stamp}"
        sources = self._retry(lambda: self.fs.find(folder), f"list {name}")
        targets = [f"{self.root}/{target}/{path[len(folder) + 1:]}" for path in sources]
        self._retry(lambda: self.fs.makedirs(f"{self.root}/{target}", exist_ok=True),
                    f"create {target}")
        if sources:
            self._retry(lambda: self.fs.copy(sources, targets), f"copy {name} to {target}")
        # Only once every object has its copy: a failed copy leaves the original as it was.
        self._retry(lambda: self.fs.rm(folder, recursive=True), f"remove {name}")
        self.fs.invalidate_cache(self.root)
        log.warning("checkpoint %s/%s was in the way of a new save at its step (%s); moved it "
                    "to %s/%s", self.url, name, problem, self.url, target)

    def _remove_partial(self, name: str) -> None:
        """Best effort: no truncated payload stays behind without a manifest. If this fails too,
        retention or the next save at this step deals with the folder."""
        try:
            self.fs.rm(f"{self.root}/{name}", recursive=True)
        except FileNotFoundError:
            return
        except Exception as e:
            log.warning("could not remove %s/%s of the failed save: %s: %s", self.url, name,
                        type(e).__name__, e)
            return
        finally:
            self.fs.invalidate_cache(self.root)
        log.warning("removed %s/%s of the failed save", self.url, name)

    def _apply_retention(self, keep: str) -> None:
        """Keep the newest `keep_last` sound checkpoints, every `keep_every_epochs`-th epoch end
        and `keep` (the checkpoint just written, hence the newest valid one); delete the other
        sound ones, and the manifest-less folders of older saves that never finished. Folders
        with a broken manifest stay for a person to look at; `checkpoints verify` names them."""
        if self.keep_last <= 0:
            return
        infos = self.list()
        sound = [info for info in infos if info.problem is None]
        newest = sound[-1].step if sound else 0
        doomed = [info.name for info in sound[: -self.keep_last]
                  if info.name != keep and not self._epoch_kept(info)]
        doomed += [info.name for info in infos
                   if info.problem == NO_MANIFEST and info.step < newest]
        for name in doomed:
            self._retry(lambda n=name: self.fs.rm(f"{self.root}/{n}", recursive=True),
                        f"delete {name}")

    def _epoch_kept(self, info: CheckpointInfo) -> bool:
        epoch = info.meta.get("epoch", 0)
        return (self.keep_every_epochs > 0 and info.meta.get("end_of_epoch", False)
                and epoch % self.keep_every_epochs == 0)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return retry_storage(call, what, self.url, retries=self.retries,
                             delay=self.retry_delay, log=log)


def _essential(error: Exception) -> str:
    """torch's refusal in one line, without its advice on how to load the file anyway (the
    point of refusing is that this file must not be loaded that way)."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error: *(\S[^\n]*?)(?: was not an allowed global|"
                      r"\. Please|\n|$)", text)
    if match:
        return match.group(1).rstrip(".")
    advice = re.compile(r"weights.only|documentation|file an issue|trust", re.IGNORECASE)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not advice.search(line)]
    first = (useful or [type(error).__name__])[0]
    return first.split(". ")[0].rstrip(".")
