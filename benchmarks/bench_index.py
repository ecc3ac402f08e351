"""The sample index at ImageNet's size: build time and memory, compact arrays against the old
list of (path, label) tuples, in one run.

1. Writes (once, cached under --tree) an ImageNet-layout tree: --classes folders x --per-class
   hard links to a small JPEG (1,000 x 1,281 = 1,281,000 entries by default).
2. For each representation, in a fresh process (so that one's garbage does not count against the
   other): lists and indexes the tree (warm cache: the tree is listed once before), measures the
   main process's RSS before and after, then runs a full pass over the index in DataLoader workers
   (each calls path(i) for its share of every i) and reads each worker's private memory (USS:
   the pages it no longer shares with the main process) against workers that did not touch it.

    nice python benchmarks/bench_index.py [--tree /tmp/bench_index_tree] [--workers 2]

Goal (issue #14): at most 40 MB per process for the index, no growth in the workers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.bench import child_pids
from pipeline.data.listing import index_split, is_image, list_classes
from pipeline.report import format_table

MB = 2**20


def write_tree(root: Path, classes: int, per_class: int) -> Path:
    """root/train/<class>/<class>_<i>.JPEG, hard links to one JPEG; kept between runs."""
    marker = root / f".complete-{classes}x{per_class}"
    if marker.is_file():
        return root
    for c in range(classes):
        name = f"n{c:08d}"  # ImageNet's wnid length
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        # One file per class (hidden, so not indexed): ext4 allows 65,000 links to a file.
        source = folder / ".source.JPEG"
        if not source.exists():
            Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(source, format="JPEG")
        for i in range(per_class):
            target = folder / f"{name}_{i}.JPEG"
            if not target.exists():
                os.link(source, target)
    marker.touch()
    return root


class ListIndex:
    """The index as it was before issue #14: a Python list of (relative path, label) tuples, built
    as pipeline/data/folder.py built it."""

    def __init__(self, root: Path, split: str):
        self.split_dir = root / split
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(list_classes(root, split)):
            with os.scandir(self.split_dir / name) as entries:
                files = sorted(e.name for e in entries
                               if is_image(e.name) and not e.name.startswith(".") and e.is_file())
            self.samples += [(f"{name}/{f}", label) for f in files]

    def path(self, i: int) -> Path:
        return self.split_dir / self.samples[i][0]

    def __len__(self) -> int:
        return len(self.samples)


class Pass:
    """A Dataset whose item k calls index.path(i) for every i of chunk k (or nothing, as the
    control: workers that never touch the index)."""

    def __init__(self, index, chunks: list[range], touch: bool):
        self.index, self.chunks, self.touch = index, chunks, touch

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> int:
        if self.touch:
            for i in self.chunks[k]:
                self.index.path(i)
        return len(self.chunks[k])


def memory(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def worker_memory(index, workers: int, touch: bool) -> list[dict[str, float]]:
    """Each worker's memory after a full pass over the index (or none, as the control)."""
    from torch.utils.data import DataLoader

    n = len(index)
    chunks = [range(s, min(s + 10_000, n)) for s in range(0, n, 10_000)]
    before = set(child_pids(os.getpid()))
    loader = DataLoader(Pass(index, chunks, touch), batch_size=None, num_workers=workers,
                        persistent_workers=True)
    assert sum(loader) == n
    pids = [p for p in child_pids(os.getpid()) if p not in before]
    result = [memory(p) for p in pids]
    del loader  # ends the workers
    return result


def measure(kind: str, tree: Path, workers: int) -> dict:
    """In this process: build the index (kind: "compact" or "list"), then the worker pass."""
    for folder in (tree / "train").iterdir():  # a warm cache for both kinds, building nothing
        with os.scandir(folder) as entries:
            sum(1 for e in entries if e.is_file())
    gc.collect()
    rss_before = memory()["rss"]
    started = time.perf_counter()
    index = index_split(tree, "train") if kind == "compact" else ListIndex(tree, "train")
    build_s = time.perf_counter() - started
    gc.collect()
    main = memory()["rss"] - rss_before
    control = worker_memory(index, workers, touch=False)
    touched = worker_memory(index, workers, touch=True)
    growth = [t["uss"] - c["uss"] for t, c in zip(touched, control)]
    return {"kind": kind, "entries": len(index), "build_s": build_s, "main_mb": main,
            "worker_uss_mb": [t["uss"] for t in touched],
            "worker_growth_mb": growth, "total_mb": main + sum(growth)}


def ratio(new: float, old: float) -> str:
    return f"{new / old:.3f}x" if old > 0.5 else "n/a (the baseline is too small to measure)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path("/tmp/bench_index_tree"),
                        help="where the hard-linked tree is written and kept between runs")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1281)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="the Markdown report (default benchmarks/index_<date>.md)")
    parser.add_argument("--measure", choices=["compact", "list"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    tree = args.tree / f"{args.classes}x{args.per_class}"
    if args.measure:  # the child process of one representation
        print(json.dumps(measure(args.measure, tree, args.workers)))
        return
    started = time.perf_counter()
    write_tree(tree, args.classes, args.per_class)
    print(f"tree {tree}: {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for kind in ("list", "compact"):
        proc = subprocess.run([sys.executable, __file__, "--measure", kind, "--tree",
                               str(args.tree), "--classes", str(args.classes), "--per-class",
                               str(args.per_class), "--workers", str(args.workers)],
                              capture_output=True, text=True, check=True)
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[kind], flush=True)
    rows = [{"index": r["kind"], "entries": r["entries"], "build s": r["build_s"],
             "main MB": r["main_mb"],
             "growth per worker MB": " / ".join(f"{g:.1f}" for g in r["worker_growth_mb"]),
             "main + workers MB": r["total_mb"]} for r in results.values()]
    old, new = results["list"], results["compact"]
    ratios = (f"compact / list: build time {ratio(new['build_s'], old['build_s'])}, main "
              f"process memory {ratio(new['main_mb'], old['main_mb'])}, main + workers "
              f"{ratio(new['total_mb'], old['total_mb'])}")
    table = format_table(rows, ["index", "entries", "build s", "main MB",
                                "growth per worker MB", "main + workers MB"])
    print(table + "\n" + ratios)
    command = " ".join(["python", "benchmarks/bench_index.py", *sys.argv[1:]])
    out = args.out or Path(__file__).parent / f"index_{datetime.date.today():%Y%m%d}.md"
    out.write_text(
        f"# The sample index at {new['entries']:,} entries ({datetime.date.today()})\n\n"
        f"`{command}` on {platform.node()} ({os.cpu_count()} cores, Python "
        f"{platform.python_version()}), {args.workers} DataLoader workers.\n\n"
        "main MB: the RSS the index adds to the process that builds it (after gc). Growth per "
        "worker: a worker's private memory (USS) after a pass that calls path(i) for its share "
        "of every i, minus that of a worker that touched nothing (copy-on-write copies).\n\n"
        f"```\n{table}\n```\n\n{ratios}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
