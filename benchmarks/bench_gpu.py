"""Everything issue #8 asks of a GPU, in one run: training images/s per GPU, MFU and what limits it.

On one GPU, with bf16 and channels_last (the ILSVRC configs), for each model: the bare step
(synthetic tensors on the device), the full step with synthetic batches and with DALI decoding
real JPEGs on the GPU, each against the bare step of the same run; model FLOPs utilisation against
the GPU's dense bf16 peak; a torch.profiler breakdown (loader wait, host, kernels) of the DALI
step; and DALI's 'mixed' decode alone at batch 256. Writes a Markdown report (and JSON) dated
and named after the device.

    python benchmarks/bench_gpu.py                     # on the GPU machine, ~5-10 minutes
    python benchmarks/bench_gpu.py --models resnet50_opt --batch-size 128 --out /tmp/gpu

Targets: plain ResNet-50 (resnet50_opt) through the pipeline >= 3,000 images/s on one H100; the
full step >= 0.9x the bare step. Runs on the CPU too (small sizes), for trying the script out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from bench_loader import write_dataset  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.bench import bench_loader  # noqa: E402
from pipeline.report import format_table  # noqa: E402
from pipeline.train.bench import bench_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"resnet50_opt": "ilsvrc_resnet50_opt.yaml", "resnet50_ann": "ilsvrc_resnet50_sieve.yaml",
           "msdnet26": "ilsvrc_msdnet26_sieve.yaml"}
TARGET_IMAGES_PER_S = 3000  # plain ResNet-50 on one H100 (issue #8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=10000, help="JPEGs to generate for DALI")
    p.add_argument("--data", type=Path, default=Path("/tmp/imagenet_like"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="for MFU on a GPU the script does not know (default: H100/H200/A100...)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--compile-models", nargs="*", default=["resnet50_opt", "resnet50_ann"],
                   choices=list(CONFIGS), help="also timed with train.compile, on synthetic data")
    p.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"],
                   help="torch.compile modes to time (reduce-overhead: with CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor",
                   help="aot_eager for a quick dry run on the CPU (no code generation)")
    p.add_argument("--profiles", type=Path, default=None,
                   help="folder for the torch.profiler traces (default: --out)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    profiles = args.profiles or args.out

    common = [f"data.batch_size={args.batch_size}", f"data.workers={os.cpu_count()}",
              f"train.device={args.device}", f"data.root={args.data}",
              f"data.image_size={args.image_size}"]
    loaders = ["synthetic", "dali"] if importlib.util.find_spec("nvidia.dali") else ["synthetic"]
    if "dali" in loaders:  # only DALI reads them; synthetic batches need no files
        write_dataset(args.data, args.images, classes=100)
    else:
        print("NVIDIA DALI is not installed: the DALI rows and its decode are not measured",
              flush=True)
    runs = [(model, loader, "eager") for model in args.models for loader in loaders]
    runs += [(model, "synthetic", mode) for model in args.compile_models
             for mode in args.compile_modes]
    rows, results = [], {}
    for model, loader, mode in runs:
        overrides = [*common, f"data.backend={loader}"]
        if loader == "dali":  # what DALI hands over is what the model wants: no conversion
            overrides += ["data.dtype=float16", "data.channels_last=true"]
        if mode != "eager":
            overrides += ["train.compile=true", f"train.compile_mode={mode}",
                          f"train.compile_backend={args.compile_backend}"]
        cfg = load_config(ROOT / "configs" / CONFIGS[model], overrides)
        profile_dir = profiles / f"profile_{model}" if loader == "dali" else None
        r = bench_train(cfg, steps=args.steps, warmup=5, peak_tflops=args.peak_tflops,
                        profile_dir=profile_dir)
        name = f"{model}/{loader}" + ("" if mode == "eager" else f"/compile {mode}")
        eager = results.get(f"{model}/synthetic")
        if eager is not None and mode != "eager":  # the baseline of the same run
            r["vs_eager"] = r["bare_images_per_s"] / eager["bare_images_per_s"]
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        rows.append(row(model, loader if mode == "eager" else f"{loader}, compile {mode}", r))

    # The DALI settings the training steps above used, alone: decode + augment, no model.
    decode = None
    if "dali" in loaders:
        dali = load_config(ROOT / "configs" / CONFIGS[args.models[0]],
                           [*common, "data.backend=dali", "data.dtype=float16",
                            "data.channels_last=true"])
        decode = results["dali_decode"] = bench_loader(dali.data, "train", batches=30, warmup=5)
    write_report(args, rows, results, decode)


def row(model: str, loader: str, r: dict) -> dict:
    mfu = f"{r['full_mfu']:.1%} / {r['bare_mfu']:.1%}" if r.get("full_mfu") is not None else "-"
    prof = r.get("profile") or {}
    kernel = prof.get("kernel_ms")
    return {"model": model, "loader": loader, "full img/s": r["full_images_per_s"],
            "bare img/s": r["bare_images_per_s"], "ratio": r["ratio"],
            "bare vs eager": f"{r['vs_eager']:.2f}x" if "vs_eager" in r else "",
            "GFLOPs/img": r["train_gflops_per_image"], "TFLOP/s": r["full_tflops"],
            "MFU full / bare": mfu, "loader wait": f"{r['loader_wait_fraction']:.0%}",
            "step ms: wall / host / kernels": (
                f"{prof['wall_ms']:.0f} / {prof['host_step_ms']:.0f} / "
                f"{'-' if kernel is None else f'{kernel:.0f}'}" if prof else "")}


def write_report(args: argparse.Namespace, rows: list[dict], results: dict,
                 decode: dict | None) -> None:
    first = next(iter(results.values()))
    today = datetime.date.today().isoformat()
    device = first["device_name"].replace(" ", "_")
    stem = args.out / f"gpu_{today}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    peak = first["peak_tflops"] or "an unknown peak (pass --peak-tflops)"
    plain = results.get("resnet50_opt/dali")
    verdict = ("" if plain is None else
               f"Plain ResNet-50 through the pipeline (DALI): {plain['full_images_per_s']:.0f} "
               f"images/s (target {TARGET_IMAGES_PER_S}: "
               f"{'met' if plain['full_images_per_s'] >= TARGET_IMAGES_PER_S else 'not met'}).\n")
    text = (f"# Training throughput on {first['device_name']} ({today})\n\n"
            f"`python benchmarks/bench_gpu.py --batch-size {args.batch_size} --steps "
            f"{args.steps}` ({args.images} generated ImageNet-like JPEGs, batch "
            f"{args.batch_size}, amp {first['amp']}, channels_last). Full step = loader + copy "
            f"+ forward/backward/optimizer; bare = the same on device-resident tensors, in the "
            f"same run. MFU against {peak} TFLOP/s (dense bf16).\n\n"
            f"{format_table(rows, list(rows[0]))}\n\n{verdict}"
            + (f"DALI decode + augment alone, batch {args.batch_size}, {decode['device']}: "
               f"{decode['images_per_s']:.0f} images/s.\n\nProfiles (Chrome traces, top ops): "
               f"{', '.join(str(args.profiles or args.out) + f'/profile_{m}' for m in args.models)}"
               ".\n" if decode else "DALI is not installed here: no DALI rows, no decode "
               "figure.\n"))
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
