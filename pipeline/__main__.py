"""`python -m pipeline <verb>` (also installed as `anytime-pipeline`).

    prepare fashion-mnist --out data/fashion-mnist     real JPEGs in the ImageNet folder layout
    prepare shards data/imagenet --out s3://bucket/imagenet-shards   tar shards + shards.json
    train --config configs/demo_fmnist_resnet_ann.yaml train.epochs=3 loss.scheme=sieve
    describe --model resnet_ann_cifar20 --scheme sieve [--json]
    checkpoints list|verify s3://bucket/runs/demo/checkpoints [--endpoint-url URL]
    bench train --config configs/demo_fmnist_resnet_ann.yaml [--steps 30] [--profile DIR] [--json]
    eval --checkpoint runs/demo_fmnist/checkpoints --data data/fashion-mnist [--json] [--budgeted 8]
    assemble --members URL1 URL2 URL3 --val data/fashion-mnist --out runs/eann [--budgeted 8]
    export runs/demo_fmnist --out model.pt2 [--until 3] [--eann] [--batch 64] [--json]
    bench loader --backend dali|torch|synthetic|decode --data DIR [--batch-size 256]
    data verify DIR [--out DIR] [--workers N]     lists of the images that decode, and the bad
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import UserError, cli_main


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum, else argparse's one-line usage error (exit 2)."""
    def convert(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value
    convert.__name__ = "int"  # argparse names the type in its message
    return convert


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """argparse type: a number > 0, else argparse's own one-line usage error (exit 2)."""
    def convert(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its message
    return convert


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("prepare", help="convert a small real data set to the ImageNet layout, "
                                         "or an ImageNet-layout folder to tar shards")
    p.add_argument("dataset", choices=["fashion-mnist", "digits", "shards"],
                   help="shards: SRC (an ImageNet-layout folder, a path or s3://...) -> tar "
                        "shards + shards.json at --out (a path or s3://...)")
    p.add_argument("src", nargs="?", help="shards: the ImageNet-layout folder to convert")
    p.add_argument("--out", required=True, help="folder (or, for shards, URL) to create")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    p.add_argument("--images-per-shard", type=positive(int), default=1000)
    p.add_argument("--order", choices=["shuffled", "sorted"], default="shuffled",
                   help="shards: images mixed over the shards (seeded by --seed) or in class "
                        "order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=at_least(0), default=0,
                   help="shards: processes (default: all cores)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible server for s3:// URLs")

    p = verbs.add_parser(
        "train", help="train (or resume, with resume=auto) a run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a run, or continue it from its newest valid checkpoint with "
                    "resume=auto.",
        epilog="resuming on another number of processes (a requeue on fewer nodes, say):\n"
               "  the weights, optimizer, loss state, step, epoch and the exact data position\n"
               "  carry over: the new processes share out the rest of the epoch, each sample\n"
               "  once. Set train.global_batch (images per step over all processes) to keep\n"
               "  the recipe's batch: data.batch_size is then the most per forward pass, and\n"
               "  gradient accumulation makes up the rest. Without it the global batch is\n"
               "  data.batch_size x processes, and a resume that changes it is refused unless\n"
               "  train.allow_batch_change=true.")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/demo_*.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.epochs=3 ...")

    p = verbs.add_parser("describe", help="table of a model's exits: cost, parameters, weights")
    p.add_argument("--config", help="YAML run config (its model, data and loss sections)")
    p.add_argument("--model", help="registered model name, e.g. resnet_ann_cifar20")
    p.add_argument("--scheme", help="loss-weight scheme, e.g. sieve")
    p.add_argument("--image-size", type=int,
                   help="input height = width (default: the config's, else the model's: 32 for "
                        "the CIFAR models, 224 for the others)")
    p.add_argument("--num-classes", type=int,
                   help="classes (default: the config's, else the model's: 10 or 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")

    p = verbs.add_parser("checkpoints", help="list or verify the checkpoints at a URL")
    p.add_argument("action", choices=["list", "verify"],
                   help="list: read manifests only; verify: also check every payload (size, "
                        "sha256, loads as plain tensors); exit status 1 when any is broken")
    p.add_argument("url", help="checkpoint folder: a path, file://, s3://, gs:// ...")
    p.add_argument("--endpoint-url", default="", help="S3-compatible server, e.g. MinIO")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = verbs.add_parser("bench", help="measure images/s against a baseline in the same run")
    targets = p.add_subparsers(dest="target", required=True)
    p = targets.add_parser("train", help="full training step vs the bare step on synthetic data")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--steps", type=positive(int), default=30,
                   help="timed steps per measurement")
    p.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps first")
    p.add_argument("--peak-tflops", type=positive(float), default=None,
                   help="the device's peak for MFU (default: known GPUs' dense bf16 peak)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also profile 5 full steps: DIR/trace.json (Chrome trace), DIR/ops.txt")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p = targets.add_parser("loader", help="images/s of one loader back end (decode: the limit)")
    p.add_argument("--backend", required=True, choices=["dali", "torch", "synthetic", "decode"],
                   help="decode: full JPEG decode only, on all cores (the CPU's limit)")
    p.add_argument("--data", required=True, help="ImageNet-layout root: DIR/train/<class>/...")
    p.add_argument("--split", default="train", help="train: training augmentation; val: eval")
    p.add_argument("--batch-size", type=positive(int), default=256)
    p.add_argument("--image-size", type=positive(int), default=224)
    p.add_argument("--workers", type=at_least(0), default=os.cpu_count(),
                   help="DALI threads / DataLoader workers (default: all cores)")
    p.add_argument("--batches", type=positive(int), default=20, help="timed batches")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed batches first")
    p.add_argument("overrides", nargs="*", help="dotted data overrides: dtype=float16 ...")

    p = verbs.add_parser("data", help="check a data set: list the images that decode")
    p.add_argument("action", choices=["verify"])
    p.add_argument("root", help="ImageNet-layout root holding train/ and val/ (or s3://...), or "
                                "the shards.json of tar shards")
    p.add_argument("--splits", nargs="+", default=None, help="default: train and val, if there")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the lists (default: the root; then set data.file_lists)")
    p.add_argument("--workers", type=positive(int), default=None,
                   help="processes (default: all cores)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible server for an s3:// root")

    p = verbs.add_parser("eval", help="per-exit top-1/top-5 error and cost of a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint URL: a run's checkpoints folder (newest valid) or one "
                        "step-XXXXXXXX folder; a path, file://, s3:// ...")
    p.add_argument("--data", required=True, help="data root holding the split folder")
    p.add_argument("--out", default=None, help="local folder for eval.json and the plots "
                                               "(default runs/eval-<run name>)")
    _add_eval_options(p)

    p = verbs.add_parser("assemble", help="stitch separately trained members into an EANN")
    p.add_argument("--members", required=True, nargs="+", help="checkpoint URLs, one per member")
    p.add_argument("--val", required=True, help="held-out data root (its --split folder)")
    p.add_argument("--out", required=True, help="folder URL for eann.safetensors, eann.json "
                                                "and the plots (a path, s3:// ...)")
    _add_eval_options(p)

    p = verbs.add_parser("export", help="torch.export a checkpoint or an EANN for serving: one "
                                        ".pt2 file, its exits' costs, classes and input inside")
    p.add_argument("checkpoint", help="a run folder, its checkpoints folder (newest valid) or one "
                                      "step-XXXXXXXX folder; with --eann an EANN folder or "
                                      "eann.safetensors; a path, file://, s3:// ...")
    p.add_argument("--out", required=True, help="file URL to write, e.g. model.pt2, s3://...")
    p.add_argument("--until", type=at_least(1), default=None, metavar="K",
                   help="keep exits 1..K (EANN: its first K scheduled outputs); default all")
    p.add_argument("--eann", action="store_true", help="CHECKPOINT is an EANN from `assemble`")
    p.add_argument("--batch", type=positive(int), default=None, metavar="N",
                   help="fix the batch size at N (default: any batch size)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible server, e.g. MinIO")
    p.add_argument("--json", action="store_true", help="print what is stored beside the graph")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    previous_sigint = on_ctrl_c_interrupt_this_process_only()
    try:
        if args.verb == "prepare":
            return prepare(args)
        if args.verb == "train":
            return train(args)
        if args.verb == "describe":
            return describe(args)
        if args.verb == "checkpoints":
            return checkpoints(args)
        if args.verb == "bench":
            return bench(args)
        if args.verb == "eval":
            return evaluate(args)
        if args.verb == "assemble":
            return assemble(args)
        if args.verb == "data":
            return data(args)
        if args.verb == "export":
            return export(args)
    except KeyboardInterrupt:  # Ctrl-C in any verb: one line and the shell's code, 130
        from pipeline.train.preemption import EXIT_INTERRUPTED  # no torch: a light import

        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    return 1


def on_ctrl_c_interrupt_this_process_only() -> signal.Handlers | None:
    """Ctrl-C signals the whole foreground process group: raise KeyboardInterrupt in this
    process only. Its forked workers (process pools, DataLoader workers) ignore it and are shut
    down by this process as it unwinds, instead of each printing a KeyboardInterrupt traceback.
    `train` replaces it (pipeline/train/preemption.py: Ctrl-C saves a checkpoint first). Returns
    the handler it replaced; None where it installs none: not the main thread, or SIGINT is
    ignored (a background job of a non-interactive shell: not for Ctrl-C)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        return None
    pid = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() == pid:
            raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, interrupt) or signal.SIG_DFL


def prepare(args: argparse.Namespace) -> int:
    if args.dataset == "shards":
        from pipeline.data.shard_writer import prepare_shards

        if not args.src:
            raise UserError("prepare shards needs SRC: python -m pipeline prepare shards "
                            "data/imagenet --out s3://bucket/imagenet-shards")
        summary = prepare_shards(args.src, args.out, images_per_shard=args.images_per_shard,
                                 order=args.order, seed=args.seed, workers=args.workers,
                                 endpoint_url=args.endpoint_url)
        print(json.dumps(summary))
        return 0
    from pipeline.data.prepare import prepare_digits, prepare_fashion_mnist

    out = Path(args.out)
    try:
        if args.dataset == "fashion-mnist":
            summary = prepare_fashion_mnist(out, limit=args.limit)
        else:
            summary = prepare_digits(out)
    except PermissionError as e:
        raise UserError(f"cannot write {out}: {e.strerror}; choose a writable --out") from e
    print(json.dumps(summary, default=str))
    return 0


def train(args: argparse.Namespace) -> int:
    from pipeline.train.preemption import watch_preemption

    # first: a SIGUSR1/SIGTERM while starting up still exits 75, a Ctrl-C 130
    preemption = watch_preemption()
    # The handlers go however this ends (the trainer removes them too), a refused config
    # included: in a process that lives on (tests, a notebook) they would outlive the run, and
    # the forked workers of a later process pool would ignore Pool.terminate's SIGTERM.
    try:
        from pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)  # before any set-up: fail fast
        if preemption.signal_name:
            logging.getLogger("pipeline.train").warning(
                "%s (%s) before the first step: nothing to save; exiting", preemption.stopped_as,
                preemption.signal_name)
            return preemption.exit_code
        from pipeline.train.trainer import train as run_training

        results = run_training(cfg)
        return preemption.exit_code if results.get("signal") else 0
    finally:
        preemption.restore()


def describe(args: argparse.Namespace) -> int:
    import timm

    import pipeline.models  # noqa: F401  (registers the models)
    from pipeline.anytime.weights import static_weights
    from pipeline.config import load_config
    from pipeline.models import create_anytime_model, exit_costs, pretrained_cfg
    from pipeline.report import format_table

    if not args.config and not args.model:
        raise UserError("describe needs --config FILE or --model NAME")
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.scheme:
        overrides.append(f"loss.scheme={args.scheme}")
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    cfg = load_config(args.config, overrides)
    # The model's pretrained cfg (timm's defaults for it), like the data section's unset keys.
    pretrained = pretrained_cfg(cfg.model.name)
    num_classes = (args.num_classes or cfg.model.num_classes
                   or (pretrained.num_classes if pretrained else 1000))
    model = create_anytime_model(cfg.model.name, num_classes, **cfg.model.kwargs)
    if not hasattr(model, "num_exits"):
        anytime = timm.list_models("*ann*") + timm.list_models("msdnet*")
        raise UserError(f"{cfg.model.name} is a timm model but not an anytime network; "
                        f"anytime models: {', '.join(anytime)}")
    weights = static_weights(cfg.loss.scheme, model.num_exits, cfg.loss.opt_exit)
    costs = exit_costs(model, (3, cfg.data.image_size, cfg.data.image_size))
    rows = [{**c.to_dict(), "weight": w} for c, w in zip(costs, weights)]
    if args.json:
        print(json.dumps({"model": cfg.model.name, "image_size": cfg.data.image_size,
                          "num_classes": num_classes, "scheme": cfg.loss.scheme,
                          "total_params": sum(p.numel() for p in model.parameters()),
                          "exits": rows}, indent=1))
        return 0
    table = [{"exit": r["index"], "position": r["position"], "MMACs": r["macs"] / 1e6,
              "MMACs (own head)": r["macs_own_head"] / 1e6, "params": r["params"],
              "weight": r["weight"]} for r in rows]
    print(f"{cfg.model.name} at {cfg.data.image_size}x{cfg.data.image_size}, {num_classes} "
          f"classes, {cfg.loss.scheme} weights. MACs are cumulative, every earlier head "
          f"included; 'own head' counts only this exit's head.")
    print(format_table(table, list(table[0])))
    return 0


def bench(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    if args.target == "loader":
        return bench_loader(args)

    cfg = load_config(args.config, args.overrides)
    if args.profile is not None and args.profile.exists() and not args.profile.is_dir():
        raise UserError(f"--profile {args.profile} is a file; give a folder for the trace")
    from pipeline.train.bench import bench_train

    r = bench_train(cfg, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops,
                    profile_dir=args.profile)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    mfu = "MFU: pass --peak-tflops" if r["peak_tflops"] is None else (
        f"MFU {r['full_mfu']:.1%} (bare {r['bare_mfu']:.1%}) of {r['peak_tflops']:.0f} TFLOP/s")
    print(f"{r['train_gflops_per_image']:.3g} GFLOPs per training image (forward + backward, all "
          f"exits): full step {r['full_tflops']:.3g} TFLOP/s, {mfu}; the host waited for the "
          f"loader {r['loader_wait_fraction']:.0%} of the full step's time")
    if "profile" in r:
        p = r["profile"]
        kernels = "" if p["kernel_ms"] is None else f", kernels on the device {p['kernel_ms']:.1f}"
        print(f"profile of {p['steps']} full steps, ms per step: wall {p['wall_ms']:.1f}, "
              f"loader wait {p['loader_wait_ms']:.1f}, host in the step {p['host_step_ms']:.1f}"
              f"{kernels}; trace {p['trace']}, top ops {p['ops']}")
    print(f"{cfg.model.name}, batch {r['batch_size']}, {r['steps']} steps on {r['device']} "
          f"({r['device_name']}, amp {r['amp']}): full training step "
          f"{r['full_images_per_s']:.0f} images/s, bare step (synthetic tensors on the device) "
          f"{r['bare_images_per_s']:.0f} images/s, ratio {r['ratio']:.2f}")
    return 0


def bench_loader(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data.bench import bench_loader, decode_limit

    if args.backend == "decode":
        images = args.batch_size * args.batches
        r = decode_limit(args.data, args.split, images=images, processes=args.workers)
    else:
        # The flags first, so an override of the same key wins; "dtype=..." or "data.dtype=..."
        overrides = [f"data.root={args.data}", f"data.backend={args.backend}",
                     f"data.batch_size={args.batch_size}", f"data.image_size={args.image_size}",
                     f"data.workers={args.workers}"] + [
            o if o.startswith("data.") else f"data.{o}" for o in args.overrides]
        cfg = load_config(None, overrides)
        r = bench_loader(cfg.data, args.split, batches=args.batches, warmup=args.warmup)
    print(f"{r['backend']} on {r['device']} ({r['workers']} workers), {r['images']} images of "
          f"{args.data}/{args.split}: {r['images_per_s']:.0f} images/s, "
          f"{r['cpu_ms_per_image']:.2f} CPU ms per image")
    return 0


def data(args: argparse.Namespace) -> int:
    from pipeline.data.verify import verify_split
    from pipeline.storage.urls import is_manifest, is_remote

    if is_manifest(args.root):
        return verify_shard_splits(args)

    splits = args.splits or [s for s in ("train", "val")
                             if is_remote(args.root) or (Path(args.root) / s).is_dir()]
    if not splits:
        raise UserError(f"{args.root} has no train/ or val/ folder; name the split folders "
                        "with --splits")
    bad = 0
    for split in splits:
        r = verify_split(args.root, split, out=args.out, workers=args.workers,
                         endpoint_url=args.endpoint_url)
        print(f"{split}: {r.images - len(r.bad)} of {r.images} images decode "
              f"({r.images / max(r.seconds, 1e-9):.0f} images/s); list: {r.list_path}")
        bad += len(r.bad)
        if r.bad:
            print(f"{split}: {len(r.bad)} bad images, listed in {r.bad_path}:")
            for rel, error in list(r.bad.items())[:20]:
                print(f"  {rel}: {error}")
            if len(r.bad) > 20:
                print(f"  ... and {len(r.bad) - 20} more")
    if args.out:
        print(f"the loaders read these lists with data.file_lists={args.out}")
    return 1 if bad else 0  # like `checkpoints verify`: a script can tell that something failed


def verify_shard_splits(args: argparse.Namespace) -> int:
    from pipeline.data.shards import shard_splits
    from pipeline.data.verify import verify_shards

    problems = 0
    for split in args.splits or shard_splits(args.root, args.endpoint_url):
        index, found = verify_shards(args.root, split, workers=args.workers,
                                     endpoint_url=args.endpoint_url)
        print(f"{split}: {len(index.shards)} shards, {len(index)} samples: "
              f"{len(found) or 'no'} problem(s)")
        for line in found[:50]:
            print(f"  {line}")
        if len(found) > 50:
            print(f"  ... and {len(found) - 50} more")
        problems += len(found)
    if problems:
        print("convert the source again into the same --out (`python -m pipeline prepare "
              "shards`) after deleting the shards named above")
    return 1 if problems else 0


def checkpoints(args: argparse.Namespace) -> int:
    from pipeline.report import format_table
    from pipeline.storage.checkpoints import CheckpointStore

    store = CheckpointStore(args.url, endpoint_url=args.endpoint_url)
    rows, broken = [], []
    for info in store.list():  # every step-* folder, broken ones and saves in progress too
        problem = info.problem if args.action == "list" or info.problem else store.verify(info)
        status = problem or ("manifest ok" if args.action == "list" else "valid")
        rows.append({"name": info.name, "step": info.step, "epoch": info.meta.get("epoch", ""),
                     "MB": info.size / 1e6, "status": status})
        if problem and not info.in_progress:  # a save being written is not broken (yet)
            broken.append(f"{info.name} ({problem})")
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_table(rows, list(rows[0])))
    else:
        print(f"no checkpoints at {args.url}")
    if broken:
        print(f"{len(broken)} broken checkpoint(s) at {store.url}: {'; '.join(broken)}",
              file=sys.stderr)
    return 1 if broken else 0


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="val", help="split folder under the data root")
    p.add_argument("--endpoint-url", default="", help="S3-compatible server, e.g. MinIO")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--budgeted", type=at_least(0), default=0, metavar="POINTS",
                   help="also run budgeted batch evaluation at this many average costs")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the checkpoint's config, "
                                                "e.g. data.batch_size=64 data.workers=8")


def _json_keeps_stdout(args: argparse.Namespace) -> None:
    """With --json, stdout holds only the JSON document: progress logging moves to stderr."""
    if args.json:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)


def evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate_checkpoint

    _json_keeps_stdout(args)
    evaluate_checkpoint(args.checkpoint, args.data, split=args.split,
                        endpoint_url=args.endpoint_url, overrides=args.overrides,
                        device=args.device, amp=args.amp, out_dir=args.out,
                        budgeted=args.budgeted, print_json=args.json)
    return 0


def assemble(args: argparse.Namespace) -> int:
    import re

    from pipeline.eann.assemble import assemble as run_assembly

    _json_keeps_stdout(args)
    # --members takes every word up to the next option, so overrides written after it
    # (data.batch_size=64) land there: move them back.
    override = re.compile(r"[a-z_]+(\.[a-z_]+)+=")
    members = [m for m in args.members if not override.match(m)]
    overrides = [m for m in args.members if override.match(m)] + args.overrides
    run_assembly(members, args.val, args.out, split=args.split,
                 endpoint_url=args.endpoint_url, overrides=overrides, device=args.device,
                 amp=args.amp, budgeted=args.budgeted, print_json=args.json)
    return 0


def export(args: argparse.Namespace) -> int:
    from pipeline.export import export_checkpoint, save_exported
    from pipeline.report import format_table

    _json_keeps_stdout(args)
    program, meta = export_checkpoint(args.checkpoint, until=args.until, eann=args.eann,
                                      endpoint_url=args.endpoint_url, batch=args.batch)
    save_exported(args.out, program, meta, endpoint_url=args.endpoint_url)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    print(format_table(meta["outputs"], [k for k in meta["outputs"][0] if k != "top5_error"]))
    size = "x".join(map(str, meta["input"]["size"]))
    print(f"exported {meta['model']} ({len(meta['outputs'])} outputs, input {size}, batch "
          f"{args.batch or 'any'}) to {args.out}; serve it with "
          "torch.export.load(path).module()(x) -> tuple of logits, first to last")
    return 0


if __name__ == "__main__":
    sys.exit(main())
