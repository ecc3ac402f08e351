"""A data set as tar shards (the WebDataset layout) and the manifest that names them: the format,
and its index for the loaders.

    out/shards.json                  the manifest, written last: classes, per split its shards
                                     (samples, bytes, sha256), its sample table, the images left out
    out/train/shard-000000.tar       per sample <class>/<stem>.jpg and <class>/<stem>.cls (label)
    out/train/shard-000000.idx       DALI's index for fn.readers.webdataset
    out/train/samples.npz            where each sample's image lies: byte offset and size in its
                                     shard, crc32, label; samples numbered shard after shard

`python -m pipeline prepare shards` writes them (pipeline/data/shard_writer.py); `data.root`
set to the manifest's URL (`s3://bucket/imagenet-shards/shards.json`) makes both back ends read
them (pipeline/data/shard_reader.py). The sample table is what lets a loader read a sample
without scanning its tar: 14 bytes per sample, ~18 MB for ImageNet's 1.28M (the folder index
takes ~33 MB), loaded in one request.

Everything read from the manifest is checked: it comes from a bucket (untrusted), and a one-line
error naming the field beats an IndexError in a DataLoader worker an hour into a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.index import DataIdentity
from pipeline.errors import UserError
from pipeline.storage.urls import is_remote, open_url

FORMAT = "anytime-pipeline-shards/1"
MANIFEST = "shards.json"
TABLE = "samples.npz"
MAX_SHARD_BYTES = 2**32 - 1  # the table's offsets are uint32
TAR_BLOCK = 512  # a tar header: a sample's header block lies right before its data


def shard_name(split: str, number: int) -> str:
    return f"{split}/shard-{number:06d}.tar"


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the manifest's folder: "train/shard-000000.tar"
    samples: int
    bytes: int
    sha256: str


class ShardIndex:
    """One split of a shard data set: every sample's shard, byte range, crc32 and label.

    Sample i lies in shard `shard_of(i)`, its image at bytes [offsets[i], offsets[i] + sizes[i])
    of that shard; samples are numbered shard after shard, so shard s holds samples
    starts[s] .. starts[s + 1] - 1.
    """

    def __init__(self, url: str, split: str, classes: list[str], shards: list[Shard],
                 offsets: np.ndarray, sizes: np.ndarray, crcs: np.ndarray, labels: np.ndarray,
                 identity: DataIdentity, left_out: int, endpoint_url: str = "",
                 order: str = "shuffled"):
        self.url = url  # the manifest's
        # the folder its names are relative to ("." for a bare data.root=shards.json)
        self.base = url.rsplit("/", 1)[0] if "/" in url else "."
        self.split = split
        self.classes = classes
        self.shards = shards
        self.starts = np.concatenate([[0], np.cumsum([s.samples for s in shards])]).astype(
            np.int64)
        self.offsets, self.sizes, self.crcs, self.labels = offsets, sizes, crcs, labels
        self._identity = identity
        self.left_out = left_out  # images of the source that did not decode
        self.endpoint_url = endpoint_url
        self.order = order  # the converter's --order: "shuffled" (mixed classes) or "sorted"

    @property
    def is_remote(self) -> bool:
        return is_remote(self.base)

    @property
    def split_dir(self) -> str:
        """How messages name the split: `<manifest URL> (train)`."""
        return f"{self.url} ({self.split})"

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def shard_url(self, s: int) -> str:
        return f"{self.base}/{self.shards[s].name}"

    def identity(self) -> DataIdentity:
        """The source folder's identity (classes, images per class, file names), recorded by the
        converter: a run moved from the folder to its shards is on the same data set."""
        return self._identity

    def blocks(self, block: int) -> np.ndarray:
        """The first sample of each run of at most `block` consecutive samples of one shard
        (a loader reads a block with one request), then len(self)."""
        firsts = [np.arange(a, b, block) for a, b in zip(self.starts[:-1], self.starts[1:])]
        return np.concatenate([*firsts, [len(self)]]).astype(np.int64)

    def byte_range(self, first: int, last: int) -> tuple[int, int]:
        """The bytes [start, end) of samples first..last (one shard) with the header of the
        first: each sample's name can be read back from its header."""
        return (int(self.offsets[first]) - TAR_BLOCK,
                int(self.offsets[last]) + int(self.sizes[last]))


def member_name(header: bytes) -> str:
    """The member name in a tar header block (GNU long names come out cut at 100 bytes)."""
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def load_shard_index(url: str, split: str, endpoint_url: str = "",
                     check_files: bool = True) -> ShardIndex:
    """The index of `split` of the shard data set whose manifest is at `url` (local or any
    fsspec URL); a one-line UserError for a missing or malformed manifest or table, and (with
    `check_files`) for shards that are missing or of another size than the manifest says."""
    fs, path = open_url(url, endpoint_url, "data.root")
    manifest = _read_json(fs, path, url)
    classes = manifest["classes"]
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{url} has no {split!r} split (it has {', '.join(splits) or 'none'}); "
                        f"convert it with `python -m pipeline prepare shards SRC --out ...`")
    entry = splits[split]
    try:
        shards = [Shard(s["name"], s["samples"], s["bytes"], s["sha256"]) for s in entry["shards"]]
        identity = DataIdentity.from_meta(entry["identity"])
        left_out = len(entry["left_out"])
        table = entry["table"]
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(url, f"split {split!r}: {e}") from e
    for s in shards:
        if not (isinstance(s.name, str) and re.fullmatch(rf"{split}/[\w.-]+\.tar", s.name)
                and _count(s.samples) and _count(s.bytes) and s.bytes <= MAX_SHARD_BYTES
                and isinstance(s.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", s.sha256)):
            raise _malformed(url, f"shard entry {s}")
    base = path.rsplit("/", 1)[0] if "/" in path else ""
    offsets, sizes, crcs, labels = _read_table(fs, f"{base}/{table['name']}", table, url)
    n = sum(s.samples for s in shards)
    if len(labels) != n or (n and not 0 <= labels.min() <= labels.max() < len(classes)):
        raise _malformed(url, f"its {split} table holds {len(labels)} samples, labels outside "
                         f"0..{len(classes) - 1} or not the {n} its shards hold")
    options = manifest.get("options")
    order = options.get("order") if isinstance(options, dict) else None
    index = ShardIndex(url, split, classes, shards, offsets, sizes, crcs, labels, identity,
                       left_out, endpoint_url, "sorted" if order == "sorted" else "shuffled")
    if n and (np.any(offsets < TAR_BLOCK) or np.any(offsets.astype(np.int64) + sizes > np.repeat(
            [s.bytes for s in shards], [s.samples for s in shards]))):
        raise _malformed(url, f"its {split} table has byte ranges outside their shards")
    if check_files:
        check_shard_files(fs, base, index)
    return index


def shard_splits(url: str, endpoint_url: str = "") -> list[str]:
    """The splits that the manifest at `url` holds."""
    fs, path = open_url(url, endpoint_url, "data.root")
    return list(_read_json(fs, path, url)["splits"])


def shard_sizes(fs: Any, folder: str) -> dict[str, int]:
    """File name -> size of what `folder` holds (one listing; {} for no folder)."""
    try:
        return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(folder, detail=True)}
    except FileNotFoundError:
        return {}


def check_shard_files(fs: Any, base: str, index: ShardIndex) -> None:
    """Refuse shards that are missing or whose size differs from the manifest's (a truncated or
    replaced file): one listing of the split's folder."""
    try:
        listed = shard_sizes(fs, f"{base}/{index.split}")
    except Exception as e:
        raise UserError(f"cannot list the shards of {index.split_dir} ({type(e).__name__}: {e}); "
                        "check the URL, data.endpoint_url and the credentials") from e
    missing = [s.name for s in index.shards if s.name.rsplit("/", 1)[-1] not in listed]
    if missing:
        raise UserError(f"{index.url} names {len(missing)} shard(s) that are missing: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; run "
                        "`python -m pipeline prepare shards` again with the same SRC and --out "
                        "(it writes only what is missing)")
    resized = [f"{s.name} ({listed[s.name.rsplit('/', 1)[-1]]} bytes, the manifest says "
               f"{s.bytes})" for s in index.shards if listed[s.name.rsplit("/", 1)[-1]] != s.bytes]
    if resized:
        raise UserError(f"{len(resized)} shard(s) of {index.url} are not the size the manifest "
                        f"says: {', '.join(resized[:2])}{' ...' if len(resized) > 2 else ''}; "
                        "they are truncated or were replaced: delete them and run `python -m "
                        "pipeline prepare shards` again with the same SRC and --out")


def _read_json(fs: Any, path: str, url: str) -> dict[str, Any]:
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError as e:
        raise UserError(f"no shard manifest at {url}; write one with `python -m pipeline "
                        "prepare shards SRC --out FOLDER` and set data.root=FOLDER/shards.json"
                        ) from e
    except Exception as e:
        raise UserError(f"cannot read {url} ({type(e).__name__}: {e}); check the URL, "
                        "data.endpoint_url and the credentials") from e
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed(url, f"not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _malformed(url, f"its format is not {FORMAT!r}")
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise _malformed(url, "classes is not a list of names")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise _malformed(url, "splits is not an object of splits")
    return manifest


def _read_table(fs: Any, path: str, entry: dict[str, Any], url: str) -> tuple[np.ndarray, ...]:
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError as e:
        raise UserError(f"the sample table {path} that {url} names is missing; run `python -m "
                        "pipeline prepare shards` again with the same SRC and --out") from e
    if hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
        raise UserError(f"the sample table {path} does not match its sha256 in {url}; run "
                        "`python -m pipeline prepare shards` again with the same SRC and --out")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as table:
            arrays = tuple(table[k] for k in ("offsets", "sizes", "crcs", "labels"))
    except (KeyError, ValueError, OSError) as e:
        raise _malformed(url, f"its table {path}: {e}") from e
    if len({len(a) for a in arrays}) != 1 or [a.dtype.kind for a in arrays] != list("uuui"):
        raise _malformed(url, f"its table {path} has arrays of other lengths or types")
    return arrays


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _malformed(url: str, detail: str) -> UserError:
    return UserError(f"{url} is not a valid shard manifest ({detail}); write it again with "
                     "`python -m pipeline prepare shards SRC --out FOLDER`")
