"""Timings of the ImageNet anytime models: training step, and what stopping early saves.

For each model: forward+backward time of one batch (train mode), then, in eval mode without
gradients, the time of `forward(x, until=k)` for every exit k as a fraction of the full forward,
next to the fraction the cost table predicts (cumulative multiply-adds up to exit k, earlier heads
included, over the full network's). The issue asks for the two to agree within 10% of the cost
ratio. Not a test: timings depend on the machine and its load.

    python benchmarks/bench_models.py                         # every registered ImageNet model
    python benchmarks/bench_models.py --models resnet50_ann msdnet26 --reps 5
    python benchmarks/bench_models.py --device cuda --batch 64    # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import pipeline.models  # noqa: E402, F401  (registers the models)
from pipeline.models import exit_costs  # noqa: E402

MODELS = ["resnet50_ann", "resnet101_ann", "resnet152_ann", "msdnet26", "msdnet36", "msdnet41"]
# Fewer repetitions where one pass takes seconds on a small CPU.
DEFAULT_REPS = {"resnet101_ann": 3, "resnet152_ann": 3}


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a timer measures it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sum(o.logsumexp(1).mean() for o in model(x)).backward()

    step()  # warm-up: allocator, oneDNN primitive caches
    return median_time(step, reps)


@torch.no_grad()
def until_times(model: torch.nn.Module, x: torch.Tensor, reps: int) -> list[float]:
    """Median time of forward(x, until=k) for k = 1..L, exits interleaved within each repetition
    so that a change of machine load shifts every exit alike rather than a few of them."""
    model.eval()
    exits = range(1, model.num_exits + 1)
    for k in exits:  # warm-up
        model(x, until=k)
    samples: list[list[float]] = [[] for _ in exits]
    for _ in range(reps):
        for k in exits:
            synchronize()
            start = time.perf_counter()
            model(x, until=k)
            synchronize()
            samples[k - 1].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def bench(name: str, batch: int, size: int, reps: int, tolerance: float,
          device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    costs = exit_costs(model, (3, size, size))
    step = train_step_time(model, x, reps)
    times = until_times(model, x, reps)
    total_macs, full = costs[-1].macs, times[-1]
    rows = []
    for c, t in zip(costs, times):
        cost_ratio, time_ratio = c.macs / total_macs, t / full
        rows.append({"exit": c.index, "position": c.position, "gmacs": c.macs / 1e9,
                     "cost_ratio": cost_ratio, "time_ratio": time_ratio, "ms": 1e3 * t,
                     "ok": abs(time_ratio - cost_ratio) <= tolerance * cost_ratio})
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return {"name": name, "params": params, "train_step_s": step, "forward_s": full,
            "rows": rows, "reps": reps}


def print_result(r: dict, batch: int, size: int, tolerance: float) -> None:
    within = sum(row["ok"] for row in r["rows"])
    print(f"\n### {r['name']}\n")
    print(f"{r['params'] / 1e6:.2f}M parameters. Batch {batch} at {size}x{size}, median of "
          f"{r['reps']}: forward+backward (train mode) {r['train_step_s']:.2f} s; full forward "
          f"(eval, no grad) {r['forward_s']:.2f} s. Exits within {tolerance:.0%} of the cost "
          f"ratio: {within}/{len(r['rows'])}.\n")
    print("| exit | position | cumulative GMACs | cost ratio | time ratio | time (ms) "
          "| within |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['exit']} | {row['position']} | {row['gmacs']:.3f} | "
              f"{row['cost_ratio']:.3f} | {row['time_ratio']:.3f} | {row['ms']:.0f} | "
              f"{'yes' if row['ok'] else 'no'} |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS,
                        help="registered names (default: every ImageNet anytime model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=0,
                        help="timed repetitions (median); 0 = 5, or 3 for the largest models")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="allowed |time ratio - cost ratio| as a fraction of the cost ratio")
    args = parser.parse_args(argv)

    missing = [m for m in args.models if not timm.is_model(m)]
    names = [m for m in args.models if timm.is_model(m)]
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, timm {timm.__version__}, {where}; batch {args.batch}, "
          f"{args.size}x{args.size}, fp32, contiguous (NCHW)")
    if missing:
        print(f"not registered, skipped: {', '.join(missing)}")
    for name in names:
        reps = args.reps or DEFAULT_REPS.get(name, 5)
        print_result(bench(name, args.batch, args.size, reps, args.tolerance, args.device),
                     args.batch, args.size, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
