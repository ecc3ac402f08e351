"""Reproduce the seed's claims at small scale: loss-weight schemes against OPT, and an EANN.

Trains CIFAR-style ResNet-ANNs (configs/reproduce_fmnist.yaml) on a Fashion-MNIST subset with the
project's own CLI, one run after another, then writes a results table and plots:

- OPT-k (a plain network of exit k's depth: scheme `opt`, one run per exit), CONST, LINEAR, SIEVE
  with alternating weights (the seed's rule, and SIEVE-AUTHORS: the authors' rule), LINEAR with
  alternating under both rules, and ADALOSS at depth d; CONST at depth 2d; every method for each
  seed.
- An EANN of three SIEVE members of depth ratio 2 (m, 2m, 4m units per stage, m = max(1, n/2)),
  stitched by `python -m pipeline assemble`, with the measured cost ratio C.

    python benchmarks/reproduce_seed.py                 # about 70 min on 2 idle cores
    python benchmarks/reproduce_seed.py --quick         # a few minutes: tiny data, 1 epoch, 1 seed
    python benchmarks/reproduce_seed.py --quick --jobs 2   # two trainings at a time
    python benchmarks/reproduce_seed.py --methods SIEVE SIEVE-AUTHORS   # OPT and these only

Runs that finished already (results.json present) are not trained again, so an interrupted
reproduction continues where it stopped. Output: OUT/results.md, OUT/results.json, OUT/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "reproduce_fmnist.yaml"
SCHEMES = {  # method name -> loss overrides
    "CONST": ["loss.scheme=const"],
    "LINEAR": ["loss.scheme=linear"],
    "SIEVE": ["loss.scheme=sieve", "loss.alternating=true"],
    # The authors' alternating rule (sum(B) / 2 = B_L for SIEVE; the final exit on step one).
    "SIEVE-AUTHORS": ["loss.scheme=sieve", "loss.alternating=true",
                      "loss.alternating_rule=authors"],
    # LINEAR with alternating under both rules: where they differ (the authors' extra weight is
    # sum(B) / 2 = 1.875 B_L at 6 exits).
    "LINEAR-ALT": ["loss.scheme=linear", "loss.alternating=true"],
    "LINEAR-ALT-AUTHORS": ["loss.scheme=linear", "loss.alternating=true",
                           "loss.alternating_rule=authors"],
    # Weights stay 1 (= CONST) until the first update; a short run needs frequent updates.
    "ADALOSS": ["loss.scheme=adaloss", "loss.adaloss_update_every=10"],
}
EXTRAS = ["CONST-2d", "EANN"]  # CONST at twice the depth; the EANN of three SIEVE members


def units(depth: int) -> int:
    """n, the residual units per stage of a CIFAR ResNet of depth 6n+2 (3 stages, an exit each)."""
    return (depth - 2) // 6


def run_training(out: Path, name: str, overrides: list[str],
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one run through the CLI (or reuse a finished one); return its results.json."""
    results = out / name / "results.json"
    if not results.exists():
        cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG),
               f"name={name}", f"out_dir={out}", "resume=auto", *overrides]
        print(f"[{time.strftime('%H:%M:%S')}] train {name}: {' '.join(overrides)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"{name}.log"
        with log.open("w") as f:
            done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            sys.exit(f"training {name} failed (exit {done.returncode}); see {log}")
    return json.loads(results.read_text())


def errors(result: dict[str, Any]) -> list[float]:
    return [e["top1_error"] for e in result["exits"]]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def twice_as_deep(depth: int) -> int:
    """2d in the seed's sense: twice the residual units per stage (6 * 2n + 2)."""
    return 6 * 2 * units(depth) + 2


def planned_runs(depth: int, seeds: list[int], common: list[str],
                 methods: list[str]) -> dict[str, list[str]]:
    """Every training the methods need, by run name: OPT-k for each exit, `methods`, CONST at
    depth 2d, for every seed; the EANN's members (seed 0; a SIEVE run of the same depth and
    seed is the same run, trained once)."""
    plan: dict[str, list[str]] = {}
    num_exits = 3 * units(depth)
    for seed in seeds:
        at = [*common, f"model.kwargs.depth={depth}", f"seed={seed}"]
        for k in range(1, num_exits + 1):
            plan[f"d{depth}_opt{k}_s{seed}"] = [*at, "loss.scheme=opt", f"loss.opt_exit={k}"]
        for method, loss in SCHEMES.items():
            if method in methods:
                plan[f"d{depth}_{method.lower()}_s{seed}"] = [*at, *loss]
        if "CONST-2d" in methods:
            deep = twice_as_deep(depth)
            plan[f"d{deep}_const_s{seed}"] = [*common, f"model.kwargs.depth={deep}",
                                              f"seed={seed}", *SCHEMES["CONST"]]
    if "EANN" in methods:
        for d in eann_depths(depth):
            plan[f"d{d}_sieve_s0"] = [*common, f"model.kwargs.depth={d}", "seed=0",
                                      *SCHEMES["SIEVE"]]
    return plan


def train_planned(out: Path, plan: dict[str, list[str]], jobs: int) -> dict[str, dict[str, Any]]:
    """Each planned run's results.json, `jobs` trainings at a time (finished runs are reused);
    the first failure stops the ones not started."""
    env = None
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # The trainings share the cores: each with all of them as threads, they contend (the
        # quick mode on 2 cores with --jobs 2: 82 s with torch's default threads, 65 s so).
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run_training, out, name, overrides, env)
                   for name, overrides in plan.items()}
        try:
            return {name: future.result() for name, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def per_method(results: dict[str, dict[str, Any]], depth: int, seeds: list[int],
               methods: list[str]) -> dict[str, Any]:
    """{method: [per-seed errors and MACs]} from the trained runs' results."""
    runs: dict[str, list[dict[str, Any]]] = {"OPT": []}
    num_exits = 3 * units(depth)
    for seed in seeds:
        opt = [results[f"d{depth}_opt{k}_s{seed}"] for k in range(1, num_exits + 1)]
        runs["OPT"].append({"top1": [errors(r)[k] for k, r in enumerate(opt)],
                            # a plain net: its own head only
                            "macs": [r["exits"][k]["macs_own_head"] for k, r in enumerate(opt)]})
        named = {m: f"d{depth}_{m.lower()}_s{seed}" for m in SCHEMES if m in methods}
        if "CONST-2d" in methods:
            named["CONST-2d"] = f"d{twice_as_deep(depth)}_const_s{seed}"
        for method, name in named.items():
            r = results[name]
            runs.setdefault(method, []).append({"top1": errors(r),
                                                "macs": [e["macs"] for e in r["exits"]]})
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and spread of each method's per-exit error, and its relative increase over OPT."""
    summary: dict[str, Any] = {}
    for method, per_seed in runs.items():
        num_exits = len(per_seed[0]["top1"])
        exits = []
        for i in range(num_exits):
            err = mean_std([s["top1"][i] for s in per_seed])
            row = {"macs": per_seed[0]["macs"][i], "top1_mean": err[0], "top1_std": err[1]}
            if method not in ("OPT", "CONST-2d"):  # relative to OPT of the same seed and depth
                rel = [(s["top1"][i] - o["top1"][i]) / o["top1"][i]
                       for s, o in zip(per_seed, runs["OPT"])]
                row["rel_mean"], row["rel_std"] = mean_std(rel)
            exits.append(row)
        summary[method] = exits
    return summary


def verdicts(summary: dict[str, Any]) -> list[str]:
    """The seed's small-scale claims, each checked against what was measured (those whose
    methods ran)."""
    final = {m: s[-1] for m, s in summary.items()}
    lines = []

    def final_exit(method: str) -> str:
        e = final[method]
        return f"{e['rel_mean']:+.1%} over OPT ({e['top1_mean']:.2f} ± {e['top1_std']:.2f}%)"

    if "SIEVE" in final:
        sieve = final["SIEVE"]["rel_mean"]
        lines.append(f"- SIEVE near OPT at the final exit (seed: within a few %): measured "
                     f"{sieve:+.1%} -> {'agrees' if sieve <= 0.05 else 'does not agree'} "
                     f"(criterion: <= +5%).")

    if "SIEVE-AUTHORS" in final:
        seeds_rule = f"; the seed's rule {final_exit('SIEVE')}" if "SIEVE" in final else ""
        lines.append(f"- SIEVE with the authors' alternating rule: final exit "
                     f"{final_exit('SIEVE-AUTHORS')}{seeds_rule}.")
    if "LINEAR-ALT" in final and "LINEAR-ALT-AUTHORS" in final:
        lines.append(f"- LINEAR with alternating, the authors' rule: final exit "
                     f"{final_exit('LINEAR-ALT-AUTHORS')}; the seed's rule "
                     f"{final_exit('LINEAR-ALT')}.")
    for m in ("CONST", "LINEAR"):
        if m not in final:
            continue
        rel = final[m]["rel_mean"]
        lines.append(f"- {m} more than 10% worse than OPT at the final exit: measured {rel:+.1%} "
                     f"-> {'agrees' if rel > 0.10 else 'does not agree'}.")
    if "SIEVE" in final and "CONST-2d" in final:
        s, c = final["SIEVE"], final["CONST-2d"]
        close = s["top1_mean"] <= c["top1_mean"] * 1.05
        lines.append(f"- SIEVE at depth d close to CONST at depth 2d (final error): "
                     f"{s['top1_mean']:.2f}% ({s['macs'] / 1e6:.1f} MMACs) vs "
                     f"{c['top1_mean']:.2f}% ({c['macs'] / 1e6:.1f} MMACs) -> "
                     f"{'agrees' if close else 'does not agree'} "
                     f"(criterion: SIEVE's error <= 1.05x CONST-2d's).")
    return lines


def final_exit_per_seed(runs: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """Each method's final-exit error on each seed: how much of a mean's gap is one seed."""
    per_method = [f"{m} " + " / ".join(f"{r['top1'][-1]:.2f}" for r in per_seed)
                  for m, per_seed in runs.items()]
    return (f"Per seed, final exit (top-1 %, seeds {' / '.join(map(str, seeds))}): "
            + "; ".join(per_method) + ".")


def table(summary: dict[str, Any]) -> str:
    num_exits = len(summary["OPT"])
    head = "| method | " + " | ".join(f"exit {i + 1}" for i in range(num_exits)) + " |"
    lines = [head, "|---" * (num_exits + 1) + "|"]
    for method, exits in summary.items():
        cells = [f"{e['top1_mean']:.2f} ± {e['top1_std']:.2f}" for e in exits[:num_exits]]
        lines.append(f"| {method} top-1 % | " + " | ".join(cells) + " |")
        if "rel_mean" in exits[0]:
            cells = [f"{e['rel_mean']:+.1%}" for e in exits]
            lines.append(f"| {method} vs OPT | " + " | ".join(cells) + " |")
    if "CONST-2d" in summary:
        c = summary["CONST-2d"]
        lines.append("")
        lines.append(f"CONST-2d ({len(c)} exits) top-1 %: "
                     + ", ".join(f"{e['top1_mean']:.2f}" for e in c)
                     + f"; final exit at {c[-1]['macs'] / 1e6:.1f} MMACs.")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rel_ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for method, exits in summary.items():
        x = [e["macs"] / 1e6 for e in exits]
        y = [e["top1_mean"] for e in exits]
        opt = {"color": "black", "marker": "s", "linestyle": "--"}
        style = opt if method == "OPT" else {"marker": "o"}
        ax.errorbar(x, y, yerr=[e["top1_std"] for e in exits], label=method, capsize=2, **style)
        if "rel_mean" in exits[0]:
            rel_ax.plot(range(1, len(exits) + 1), [100 * e["rel_mean"] for e in exits],
                        marker="o", label=method)
    ax.set_xlabel("cumulative multiply-adds per image (millions)")
    ax.set_ylabel("validation top-1 error (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    rel_ax.axhline(0, color="black", linewidth=0.8)
    rel_ax.axhline(10, color="grey", linestyle=":", linewidth=0.8)
    rel_ax.set_xticks(range(1, len(summary["OPT"]) + 1))
    rel_ax.set_xlabel("exit")
    rel_ax.set_ylabel("relative error increase over OPT (%)")
    rel_ax.set_title("each exit against a plain network of its depth")
    rel_ax.grid(alpha=0.3)
    rel_ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def eann_table(eann: dict[str, Any]) -> str:
    lines = ["| output | member | exit | cumulative MMACs | val top-1 % | C |", "|---" * 6 + "|"]
    for i, (out, c) in enumerate(zip(eann["schedule"], eann["cost_ratio"]["per_output"])):
        lines.append(f"| {i + 1} | {out['member'] + 1} | {out['exit']} | {out['macs'] / 1e6:.2f} "
                     f"| {out['top1_error']:.2f} | {c['C']:.2f} |")
    return "\n".join(lines)


def eann_depths(depth: int) -> list[int]:
    """The EANN members' depths: m, 2m, 4m units per stage, m = max(1, n/2)."""
    m = max(1, units(depth) // 2)
    return [6 * m * f + 2 for f in (1, 2, 4)]


def assemble_eann(out: Path, depth: int, data: str) -> dict[str, Any]:
    """The trained SIEVE members (seed 0, eann_depths) stitched by the project's assembly
    stage."""
    depths = eann_depths(depth)
    members = [str(out / f"d{d}_sieve_s0" / "checkpoints") for d in depths]
    eann_out = out / "eann"
    summary = eann_out / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "pipeline", "assemble", "--members", *members,
               "--val", data, "--out", str(eann_out), "--json"]
        print(f"[{time.strftime('%H:%M:%S')}] assemble EANN of depths {depths}", flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"assemble failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        eann_out.mkdir(parents=True, exist_ok=True)
        summary.write_text(done.stdout)
    return {"depths": depths, **json.loads(summary.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="where the Fashion-MNIST subset is prepared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depth", type=int, default=14, help="d = 6n+2 (default 14: 6 exits)")
    parser.add_argument("--limit", type=int, default=10000,
                        help="Fashion-MNIST images per split (class-balanced)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--methods", nargs="+", choices=[*SCHEMES, *EXTRAS],
                        default=[*SCHEMES, *EXTRAS],
                        help="what to train besides OPT (default: everything)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at once (each is one process; on a small machine "
                             "the quick mode's runs are mostly start-up, so 2 halves its time)")
    parser.add_argument("--quick", action="store_true",
                        help="CI size (the plumbing, not the claims): 300 images, 1 epoch (2 "
                             "steps, so alternating weights take both turns), 1 seed, depth 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.depth, args.limit, args.epochs = [0], 8, 300, 1
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if (args.depth - 2) % 6 or args.depth < 8:
        parser.error(f"--depth must be 6n+2 with n >= 1, got {args.depth}")
    args.out.mkdir(parents=True, exist_ok=True)

    data = args.data_dir / f"fashion-mnist-{args.limit}"
    prepared = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "fashion-mnist",
                               "--out", str(data), "--limit", str(args.limit)], cwd=ROOT)
    if prepared.returncode != 0:
        sys.exit(f"preparing {data} failed (exit {prepared.returncode}); see the lines above")
    common = [f"data.root={data}", f"train.epochs={args.epochs}"]
    start = time.time()
    plan = planned_runs(args.depth, args.seeds, common, args.methods)
    results = train_planned(args.out, plan, args.jobs)
    runs = per_method(results, args.depth, args.seeds, args.methods)
    summary = summarise(runs)
    title = (f"ResNet-ANN depth {args.depth} on Fashion-MNIST ({args.limit} train images, "
             f"{args.epochs} epochs, {len(args.seeds)} seeds)")
    figure = plot(summary, args.out / "schemes.png", title)
    lines = [f"# {title}", "", "Validation top-1 error, mean ± std over seeds "
             f"{args.seeds}; 'vs OPT' = relative increase over a plain network of the same depth "
             "and seed (SPEC section 5).", "", table(summary), "",
             final_exit_per_seed(runs, args.seeds), "", "## Against the seed", "",
             *verdicts(summary), ""]
    eann = None
    if "EANN" in args.methods:
        eann = assemble_eann(args.out, args.depth, str(data))
        ratio = eann["cost_ratio"]
        lines += ["## EANN", "",
                  f"Members: SIEVE ResNet-ANNs of depths {eann['depths']}, full-cost growth "
                  f"b = {ratio['b']:.2f}. Cost ratio C over the {len(eann['schedule'])} emitted "
                  f"outputs: max {ratio['max']:.2f}, mean {ratio['mean']:.2f} (seed's bound "
                  f"2 + 1/(b-1) = {ratio['seed_bound']:.2f}).", "",
                  eann_table(eann), "", "Plots: eann/eann_curve.png, eann/eann_cost_ratio.png."]
    lines.append(f"Plot: {figure.name}. This invocation: {(time.time() - start) / 60:.1f} min "
                 f"(finished runs reused).")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"runs": runs, "summary": summary, "eann": eann}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
