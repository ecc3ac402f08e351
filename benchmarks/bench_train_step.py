"""The demo's training step through each loader against the bare step, in rounds, with a plot.

Each measurement is one `bench_train` call: the full step (real JPEGs through the loader, the
copy, forward, anytime loss, backward, optimizer step) and, in the same process right after, the
bare step (the same model on device-resident synthetic tensors); its ratio is full / bare. The
loaders take turns round by round, so a slow spell of a shared machine hits them all; each
loader's median ratio is reported.

    python benchmarks/bench_train_step.py [--rounds 3] [--steps 30]
        [--config configs/demo_fmnist_resnet_ann.yaml] [--out benchmarks/train_step_cpu]

Goal (issue #8): the full step >= 0.9x the bare step on the CPU for the demo model.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from pipeline.config import load_config  # noqa: E402
from pipeline.report import format_table, plot_ratio_bars  # noqa: E402
from pipeline.train.bench import bench_train  # noqa: E402

LOADERS = {  # name -> data overrides
    "torch, 1 worker (the demo)": ["data.workers=1"],
    "torch, in-process": ["data.workers=0"],
    "DALI (CPU operators)": ["data.backend=dali", "data.workers=2"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_fmnist_resnet_ann.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train_step_cpu")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=DIR")
    args = p.parse_args()
    loaders = {name: extra for name, extra in LOADERS.items()
               if "data.backend=dali" not in extra or importlib.util.find_spec("nvidia.dali")}

    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    for round_ in range(1, args.rounds + 1):
        for name, extra in loaders.items():
            cfg = load_config(args.config, [*args.overrides, *extra])
            r = bench_train(cfg, steps=args.steps)
            runs[name].append(r)
            print(f"round {round_} {name}: full {r['full_images_per_s']:.0f} images/s, bare "
                  f"{r['bare_images_per_s']:.0f}, ratio {r['ratio']:.2f}", flush=True)

    rows = []
    for name, rs in runs.items():
        def median(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        rows.append({"loader": name, "median ratio": median("ratio"),
                     "ratios": " ".join(f"{r['ratio']:.2f}" for r in rs),
                     "full img/s": median("full_images_per_s"),
                     "bare img/s": median("bare_images_per_s"),
                     "loader wait": f"{median('loader_wait_fraction'):.0%}"})
    table = format_table(rows, list(rows[0]))
    print(table)
    first = next(iter(runs.values()))[0]
    stamp = (f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}\n{first['model']} "
             f"batch {first['batch_size']}, {args.steps} steps, amp {first['amp']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"stamp": stamp, "runs": runs}, indent=1))
    plot_ratio_bars({name: [r["ratio"] for r in rs] for name, rs in runs.items()},
                    args.out.with_suffix(".png"), goal=0.9, goal_label="goal: 0.9",
                    xlabel="full training step / bare step (images/s)", title=stamp)
    print(f"{stamp}\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
