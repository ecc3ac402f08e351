"""A checkpoint's manifest: how it is written, and the strict check of everything read back.

`manifest.json` lists every payload of a checkpoint folder with its size and sha256:

    {"format": 1, "step": 468, "time": 1700000000.0,
     "files": {"state-3f2a9c0d81b7e645.pt": {"size": 123, "sha256": "<64 lowercase hex>"}},
     "meta": {"epoch": 1, "config": {...}}}

Every save names its payload anew (`state-<upload id>.pt`; checkpoints written before that hold
`state.pt`): a writer that was fenced while its upload was in flight can still land that upload
late, and it then lands on a key of its own that no committed manifest names, never on the
payload of the checkpoint another writer committed at the same step.

A manifest comes from a bucket, so it is untrusted input like the payloads: `parse` accepts only
exactly this shape (any other is a `ManifestError` naming what is wrong, never a KeyError later),
the step must be the folder's own, file names must be plain names inside the folder, so a
manifest cannot point the reader at another checkpoint's or any other object, and the meta values
this code reads (epoch, world_size, global_batch, ...) must have the types it writes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"  # the payload's name in checkpoints written before upload ids
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FOLDER = re.compile(r"step-(\d+)")
_PAYLOAD_NAME = re.compile(r"state(-[0-9a-f]{16})?\.pt")
# meta keys this code reads back, and the check of each value: a manifest from a bucket that
# says `"global_batch": "32"` is broken, not a resume refused with "32 and this job's is 32".
_META = {
    "epoch": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "end_of_epoch": ("true or false", lambda v: isinstance(v, bool)),
    "world_size": ("an integer >= 1", lambda v: is_int(v) and v >= 1),
    "global_batch": ("an integer >= 1", lambda v: is_int(v) and v >= 1),
    "config": ("an object", lambda v: isinstance(v, dict)),
    "code_version": ("a string", lambda v: isinstance(v, str)),
}


class ManifestError(ValueError):
    """The manifest is not one this code wrote; the message says what is wrong with it."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, FileEntry]
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def payload(self) -> str:
        """The name of the state's file (`parse` checked that there is exactly one)."""
        return next(name for name in self.files if _PAYLOAD_NAME.fullmatch(name))


def payload_name() -> str:
    """A new payload name, one per save: `state-<16 random hex digits>.pt`."""
    return f"state-{uuid.uuid4().hex[:16]}.pt"


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def folder_step(name: str) -> int | None:
    """The step of a `step-<number>` folder name; None for any other name."""
    match = _FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None


def build(step: int, payloads: dict[str, bytes], meta: dict[str, Any]) -> bytes:
    """The manifest of `payloads` (name -> bytes) as written next to them."""
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
             for name, data in payloads.items()}
    manifest = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "files": files,
                "meta": meta}
    return json.dumps(manifest, indent=1).encode()


def parse(raw: bytes, step: int) -> Manifest:
    """The manifest in `raw` of the folder of `step`; ManifestError unless it has exactly the
    shape `build` writes."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, absurd nesting
        raise ManifestError(f"{MANIFEST} is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{MANIFEST} holds a {type(data).__name__}, not an object")
    missing = [key for key in ("format", "step", "files", "meta") if key not in data]
    if missing:
        raise ManifestError(f"{MANIFEST} lacks {', '.join(missing)}")
    if not is_int(data["format"]) or data["format"] != FORMAT_VERSION:
        raise ManifestError(f"{MANIFEST} has format {data['format']!r}, this code reads "
                            f"{FORMAT_VERSION}")
    if not is_int(data["step"]) or data["step"] != step:
        raise ManifestError(f"{MANIFEST} names step {data['step']!r}, its folder step {step}")
    if not isinstance(data["meta"], dict):
        raise ManifestError(f"{MANIFEST}'s meta is a {type(data['meta']).__name__}, not an "
                            "object")
    for key, (expected, valid) in _META.items():
        if key in data["meta"] and not valid(data["meta"][key]):
            raise ManifestError(f"{MANIFEST}'s meta.{key} is {shown(data['meta'][key])}, not "
                                f"{expected}")
    files = data["files"]
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{MANIFEST}'s files is not a non-empty object")
    entries = {}
    for name, entry in files.items():
        problem = name_problem(name)
        if problem:
            raise ManifestError(f"{MANIFEST} lists {name!r}, {problem}")
        if (not isinstance(entry, dict) or set(entry) != {"size", "sha256"}
                or not is_int(entry["size"]) or entry["size"] < 0
                or not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"])):
            raise ManifestError(f"{MANIFEST}'s entry for {name} is not "
                                "{size: bytes >= 0, sha256: 64 lowercase hex digits}")
        entries[name] = FileEntry(entry["size"], entry["sha256"])
    payloads = [name for name in entries if _PAYLOAD_NAME.fullmatch(name)]
    if len(payloads) != 1:
        raise ManifestError(f"{MANIFEST} lists {len(payloads)} payloads, not one "
                            "(state-<upload id>.pt)" if payloads else
                            f"{MANIFEST} does not list a payload (state-<upload id>.pt)")
    return Manifest(step, entries, data["meta"])


def name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name inside its folder, or None when it is one."""
    if not name:
        return "an empty name"
    if "/" in name or "\\" in name or "\0" in name:
        return "not a plain name inside the checkpoint folder (it holds a path separator)"
    if name.startswith("."):  # also '.' and '..'
        return "not a plain name inside the checkpoint folder (it starts with '.')"
    return None


def shown(value: object) -> str:
    """A value from an untrusted JSON record as the record shows it (NaN, Infinity, "0": a
    string keeps its quotes), cut short, for a one-line message."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no number
