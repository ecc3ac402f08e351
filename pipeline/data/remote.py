"""Data roots in object storage (`data.root: s3://bucket/imagenet`), read by DALI directly.

DALI 2.4.0's file reader opens `s3://` files itself (AWS SDK; credentials from the standard
chain: AWS_* variables, ~/.aws, instance roles; an S3-compatible server from
`data.endpoint_url`, exported as AWS_ENDPOINT_URL). The listing, here, goes through fsspec/s3fs:
root/<split>/<class>/<image>, sorted as for a local folder, so the sample order and labels are
the same as for a local copy. The torch loader reads local files only: stage the data with
`aws s3 sync s3://bucket/imagenet /local/imagenet` (or `s5cmd sync`) on each node instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec

from pipeline.config import DataConfig
from pipeline.data.folder import FolderIndex, compare_classes, is_image
from pipeline.errors import UserError


def is_url(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


@dataclass
class UrlIndex(FolderIndex):
    """A FolderIndex whose root is a URL; paths are URL strings."""

    root: str

    @property
    def split_dir(self) -> str:  # type: ignore[override]
        return f"{self.root}/{self.split}"

    def path(self, i: int) -> str:  # type: ignore[override]
        return f"{self.split_dir}/{self.samples[i][0]}"


def _listing(root: str, split: str, endpoint_url: str, list_files: bool) -> tuple[list, str]:
    """(keys under root/split, recursively; or its entries, one level), and fsspec's base path;
    one-line errors for a missing package, a server that is down, or missing credentials."""
    options = {"endpoint_url": endpoint_url} if endpoint_url else {}
    try:
        fs, base = fsspec.core.url_to_fs(f"{root}/{split}", **options)
        return (fs.find(base) if list_files else fs.ls(base, detail=True)), base
    except ImportError as e:  # fsspec's message names the package the protocol needs
        raise UserError(f"data.root={root}: {e} (s3://: pip install 'anytime-pipeline[s3]')"
                        ) from e
    except FileNotFoundError:
        return [], base
    except Exception as e:  # OSError, ValueError, and botocore errors s3fs does not translate
        raise UserError(f"cannot list {root}/{split} ({type(e).__name__}: {e}); check the URL, "
                        "data.endpoint_url and the AWS_* credentials") from e


def list_url_classes(root: str, split: str, endpoint_url: str = "") -> list[str]:
    """The sorted class folder names of root/split in object storage (one level, not every key)."""
    entries, _ = _listing(root.rstrip("/"), split, endpoint_url, list_files=False)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                  if e["type"] == "directory" and not e["name"].rsplit("/", 1)[-1].startswith("."))


def index_url(root: str, split: str, endpoint_url: str = "") -> UrlIndex:
    """List root/split/<class>/<image> in object storage (one recursive listing)."""
    root = root.rstrip("/")
    keys, base = _listing(root, split, endpoint_url, list_files=True)
    per_class: dict[str, list[str]] = {}
    for key in keys:
        parts = key[len(base) + 1 :].split("/")
        if len(parts) == 2 and is_image(parts[1]) and not any(p.startswith(".") for p in parts):
            per_class.setdefault(parts[0], []).append(parts[1])
    if not per_class:
        raise UserError(f"{root}/{split} holds no <class>/<image> files; data.root must hold "
                        "train/ and val/ folders, each with one folder per class")
    classes = sorted(per_class)
    samples = [(f"{c}/{f}", label) for label, c in enumerate(classes)
               for f in sorted(per_class[c])]
    return UrlIndex(root=root, split=split, classes=classes, samples=samples)


def build_url_loader(cfg: DataConfig, split: str, *, train: bool, rank: int, world_size: int,
                     seed: int):
    """The DALI loader over a data root in object storage."""
    if cfg.backend != "dali":
        raise UserError(f"data.root={cfg.root} is in object storage, which only "
                        f"data.backend=dali reads; use it, or copy the data to local disk on "
                        f"each node (aws s3 sync {cfg.root} /local/data) and set data.root")
    if cfg.endpoint_url:
        # DALI's AWS SDK reads its endpoint from the environment only.
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    index = index_url(cfg.root, split, cfg.endpoint_url)
    if split != "train":
        train_classes = list_url_classes(cfg.root, "train", cfg.endpoint_url)
        compare_classes(train_classes, index.classes, f"{cfg.root.rstrip('/')}/train",
                        index.split_dir)
    if cfg.file_lists:
        from pipeline.data.verify import apply_file_lists

        index = apply_file_lists(index, cfg.file_lists)
    from pipeline.data.dali import DaliLoader

    return DaliLoader(cfg, index, train=train, rank=rank, world_size=world_size, seed=seed)
