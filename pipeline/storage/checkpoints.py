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

import contextlib
import hashlib
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import torch

from pipeline.errors import UserError
from pipeline.storage.atomic import create_only
from pipeline.storage.manifest import (
    MANIFEST,
    PAYLOAD,
    Manifest,
    ManifestError,
    build,
    folder_name,
    folder_step,
    parse,
    payload_name,
)
from pipeline.storage.retry import StorageError, retry_storage
from pipeline.storage.urls import open_url

__all__ = ["MANIFEST", "PAYLOAD", "CheckpointInfo", "CheckpointStore", "StorageError"]

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # <url>/quarantine/: folders moved out of a new save's way
NO_MANIFEST = f"{MANIFEST} is missing (a save that did not finish?)"
# A folder without a manifest whose last write is younger than this is taken for a save still
# being written (an upload of a large state over a slow link, or retrying through an outage),
# not a broken checkpoint; older ones are saves that never finished.
SAVE_IN_PROGRESS_S = 600.0
T = TypeVar("T")

# Answers about the storage itself: waiting does not change them, so they are not retried.
@dataclass
class CheckpointInfo:
    name: str  # folder name, e.g. "step-00000468"
    step: int  # from the folder name; -1 for a `step-*` name without a number
    meta: dict[str, Any]  # from the manifest: epoch, end_of_epoch, config, code version, ...
    size: int  # bytes of payload
    problem: str | None = None  # why it is broken (or unfinished); None = fine as far as checked
    in_progress: bool = False  # no manifest yet, but written to recently: a save under way
    payload: str = ""  # the state's file in the folder, as the manifest names it


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
        # Our retry policy is the only one (`retries`, `retry_delay`): without it a save failed
        # minutes after the configured policy gave up.
        self.fs, self.root = open_url(self.url, endpoint_url, "checkpoint.url",
                                      single_attempt=True)
        self.keep_last = keep_last
        self.keep_every_epochs = keep_every_epochs
        self.retries = retries
        self.retry_delay = retry_delay

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None, *,
             may_write: Callable[[], None] | None = None) -> str:
        """Write `state` as checkpoint `step`; returns its folder name. A folder already there
        is moved to quarantine first, never overwritten; a failed save removes what it wrote.

        `may_write()`, when given, raises if this process may no longer write (a lost lease):
        it is asked before anything is moved and again right before the commit, so a fenced
        writer never commits, and never touches a folder another writer may own by then. An
        upload still in flight when its writer was fenced can land later; it lands on this
        save's own payload name, which only this save's manifest could name, and the manifest
        is created only where none exists (where the storage can say so: S3, local paths), so
        nothing a committed checkpoint names is ever written again.
        Each storage call is retried with exponential backoff; StorageError when all fail.
        """
        name = folder_name(step)
        folder = f"{self.root}/{name}"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        payload_file = payload_name()
        manifest = build(step, {payload_file: payload}, meta or {})
        allowed = may_write or (lambda: None)

        def commit() -> None:
            # Each try asks first: a writer fenced while it backed off stops here.
            allowed()
            self._commit(folder, manifest, payload_file)

        allowed()
        self._move_aside(name)
        try:
            self._retry(lambda: self.fs.makedirs(folder, exist_ok=True), f"create {name}")
            self._retry(lambda: self.fs.pipe_file(f"{folder}/{payload_file}", payload),
                        f"upload {name}")
            # The manifest goes last: its presence is what makes the checkpoint exist.
            self._retry(commit, f"commit {name}")
        except Exception:
            self._remove_partial(name, payload_file, allowed)
            raise
        try:
            allowed()  # retention deletes: never once another writer may own the run
            self._apply_retention(keep=name)
        except Exception as e:  # a failed clean-up must not fail a good save
            log.warning("checkpoint retention in %s skipped (tried again at the next save): "
                        "%s", self.url, e)
        return name

    def _commit(self, folder: str, manifest: bytes, payload_file: str) -> None:
        """Create `folder`'s manifest unless one exists. One that names our payload is our own
        write landing before a retry; any other was committed by another writer at this step
        meanwhile (one fenced while it committed): it stays, and this save fails."""
        try:
            create_only(self.fs, f"{folder}/{MANIFEST}", manifest)
        except FileExistsError:
            if not self._names(folder, payload_file):
                raise StorageError(f"checkpoint {self.url}/{folder.rsplit('/', 1)[-1]} was "
                                   "committed by another writer while this one saved it; left "
                                   "as it is") from None

    def _names(self, folder: str, payload_file: str) -> bool:
        """Whether `folder` holds a sound manifest that names `payload_file`."""
        self.fs.invalidate_cache(folder)
        try:
            raw = self.fs.cat_file(f"{folder}/{MANIFEST}")
            return payload_file in parse(raw, folder_step(folder.rsplit("/", 1)[-1])).files
        except (OSError, ManifestError):  # absent, unreadable or not ours: it names nothing
            return False

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
        log.warning("skipping checkpoint %s/%s: %s", self.url, name, problem)

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
            age = self._seconds_since_last_write(name)
            if age is not None and age < SAVE_IN_PROGRESS_S:
                return CheckpointInfo(name, step, {}, 0, f"{MANIFEST} not written yet: a save "
                                      f"in progress (last write {age:.0f} s ago)",
                                      in_progress=True), None
            return CheckpointInfo(name, step, {}, 0, NO_MANIFEST), None
        try:
            manifest = parse(raw, step)
        except ManifestError as e:
            return CheckpointInfo(name, step, {}, 0, str(e)), None
        return CheckpointInfo(name, step, manifest.meta, manifest.size,
                              payload=manifest.payload), manifest

    def _seconds_since_last_write(self, name: str) -> float | None:
        """Seconds since anything in folder `name` (or the folder itself) was last written;
        None where the storage does not tell."""
        folder = f"{self.root}/{name}"
        try:
            paths = [folder, *self.fs.find(folder)]
            stamps = []
            for path in paths:  # (an object store's folder has no time of its own)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError,
                                         NotImplementedError):
                    stamps.append(self.fs.modified(path).timestamp())  # aware: local and s3fs
        except Exception:  # the age only softens a verdict; storage trouble shows elsewhere
            return None
        finally:
            self.fs.invalidate_cache(folder)  # the listing must not hide files written later
        return max(0.0, time.time() - max(stamps)) if stamps else None

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
        return None, loaded[manifest.payload]

    def _folders(self) -> list[str]:
        # Another process may have written since this one last listed (a resumed job), inside
        # the folders too: s3fs answers reads from its listings (a listed folder without its
        # manifest would keep the manifest "missing" after it was written).
        self.fs.invalidate_cache()
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

    def _remove_partial(self, name: str, payload_file: str,
                        may_write: Callable[[], None]) -> None:
        """Best effort: remove this save's own payload (unless a manifest names it after all:
        a commit whose reply was lost), and the folder if that leaves it empty and this writer
        still holds the run; never anything else (the folder may hold another writer's
        checkpoint by now). If this fails too, retention or the next save at this step deals
        with it."""
        folder = f"{self.root}/{name}"
        if self._names(folder, payload_file):
            log.warning("%s/%s was committed though its save reported an error; kept",
                        self.url, name)
            return
        try:
            self.fs.rm_file(f"{folder}/{payload_file}")
        except FileNotFoundError:
            pass
        except Exception as e:
            log.warning("could not remove %s/%s/%s of the failed save: %s: %s", self.url, name,
                        payload_file, type(e).__name__, e)
            return
        finally:
            self.fs.invalidate_cache(self.root)
        # An empty folder of a fenced writer may be the new holder's, just made for its save.
        with contextlib.suppress(Exception):
            may_write()
            if self.fs.isdir(folder) and not self.fs.ls(folder, detail=False):
                self.fs.rmdir(folder)
        self.fs.invalidate_cache(self.root)
        log.warning("removed %s/%s/%s of the failed save", self.url, name, payload_file)

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
        # Not a save in progress: its writer may be a run that holds the lease by now.
        unfinished = [info for info in infos if info.problem == NO_MANIFEST
                      and info.step < newest]
        for info in unfinished:
            log.warning("checkpoint retention: deleting %s/%s, a save that never finished (%s), "
                        "older than the newest checkpoint %s", self.url, info.name, info.problem,
                        folder_name(newest))
        doomed += [info.name for info in unfinished]
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
