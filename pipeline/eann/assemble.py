"""The assembly stage: separately trained members -> one EANN artifact, its report and plots.

    python -m pipeline assemble --members URL1 URL2 URL3 --val data/fmnist --out runs/eann

Every exit of every member is evaluated on the held-out images; the schedule (SPEC section 3)
keeps the outputs that improve on the last one; the measured cost ratio C of each output is
compared with the seed's bound 2 + 1/(b - 1).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.anytime.budgeted import budgeted_curve
from pipeline.data.index import class_difference
from pipeline.eann.artifact import write_artifact
from pipeline.eann.schedule import (
    build_schedule,
    cost_ratios,
    depth_ratio,
    seed_bound,
    single_member_frontier,
)
from pipeline.errors import UserError
from pipeline.evaluation import (
    Member,
    apply_overrides,
    check_classes,
    load_member,
    plot_budgeted,
    print_budgeted,
    run_exits,
)

log = logging.getLogger("pipeline.eann")

# Members must see the same pixels: the EANN feeds one input tensor to all of them.
SHARED_DATA_KEYS = ("image_size", "augment", "val_resize_ratio", "mean", "std")


def assemble(member_urls: list[str], val_root: str, out_url: str, *, split: str = "val",
             endpoint_url: str = "", overrides: list[str] = (), device: str = "auto",
             amp: str = "none", budgeted: int = 0, print_json: bool = False) -> dict[str, Any]:
    from pipeline.data import build_loader
    from pipeline.job import open_job
    from pipeline.models import exit_costs

    if not member_urls:
        raise UserError("assemble needs --members URL [URL ...]")
    with open_job(device, amp) as job:  # closes the process group however it ends
        torch_device, dist_info = job.device, job.dist
        members = [load_member(u, endpoint_url) for u in member_urls]
        check_same_inputs(members)
        cfg = apply_overrides(members[0].config, [f"data.root={val_root}", *overrides])
        size = cfg.data.image_size
        costs = [exit_costs(m.model, (3, size, size)) for m in members]
        # run order = cost order (the schedule assumes it); stable for equal costs
        order = sorted(range(len(members)), key=lambda j: costs[j][-1].macs)
        if order != list(range(len(members))):
            log.info("members reordered by cost: %s", ", ".join(member_urls[j] for j in order))
        members = [members[j] for j in order]
        costs = [costs[j] for j in order]
        loader = build_loader(cfg.data, split, train=False, rank=dist_info.rank,
                              world_size=dist_info.world_size, seed=cfg.seed)
        for m in members:
            check_classes(m, loader.classes, f"{val_root}/{split}")
        models = [m.model.to(torch_device) for m in members]
        log.info("evaluating %d members (%s) on %s/%s: %d images on %s x %d", len(members),
                 ", ".join(m.config.model.name for m in members), val_root, split,
                 loader.num_samples, torch_device, dist_info.world_size)
        results = run_exits(models, loader, torch_device, job.autocast,
                            per_image=budgeted > 0)

        member_macs = [[c.macs for c in cs] for cs in costs]
        top1 = [r.top1 for r in results]
        top5 = [r.top5 for r in results]
        schedule = build_schedule(member_macs, top1, top5)
        ratios = cost_ratios(schedule, member_macs, top1)
        b = depth_ratio(member_macs)
        c_values = [r["C"] for r in ratios]
        info: dict[str, Any] = {
            "format": "anytime-pipeline-eann/1",
            "cost_unit": "multiply-adds per image, cumulative, every earlier head of a member "
                         "included; an EANN output also counts earlier members up to their last "
                         "emitted exit",
            "image_size": size,
            "data": {k: getattr(cfg.data, k) for k in SHARED_DATA_KEYS},
            "classes": list(loader.classes),
            "val": {"data": f"{val_root}/{split}", "samples": results[0].samples, "amp": amp},
            "members": [member_record(m, cs, r) for m, cs, r in zip(members, costs, results)],
            "schedule": [e.to_dict() for e in schedule],
            "cost_ratio": {
                "per_output": ratios, "max": max(c_values), "mean": statistics.fmean(c_values),
                "b": finite_or_none(b), "seed_bound": finite_or_none(seed_bound(b)),
                "definition": "C = EANN cost of an output / cost of the cheapest single-member "
                              "exit with at most its validation top-1 error; bound 2 + 1/(b-1), "
                              "b = geometric growth of the members' full costs"},
        }
        if budgeted:
            info["budgeted"] = eann_budgeted(schedule, results, budgeted)
        if dist_info.is_main:
            with tempfile.TemporaryDirectory() as tmp:
                plots = write_plots(info, Path(tmp), budgeted=bool(budgeted))
                tensors = {f"members.{j}.{k}": v for j, m in enumerate(models)
                           for k, v in m.state_dict().items()}
                artifact = write_artifact(out_url, tensors, info, endpoint_url=endpoint_url,
                                          extra_files=plots)
            info["artifact"] = artifact
            if print_json:
                print(json.dumps(info, indent=1))
            else:
                print_report(info)
                print(f"artifact: {artifact}  plots: {', '.join(plots)} beside it")
    return info


def finite_or_none(value: float) -> float | None:
    """JSON has no inf or nan: a single member has no growth factor b, nor a bound."""
    return value if math.isfinite(value) else None


def check_same_inputs(members: list[Member]) -> None:
    first = members[0]
    for m in members[1:]:
        for key in SHARED_DATA_KEYS:
            a, b = getattr(first.config.data, key), getattr(m.config.data, key)
            if a != b:
                raise UserError(f"members take different inputs: data.{key} is {a} in "
                                f"{first.source} but {b} in {m.source}; an EANN feeds one "
                                "input to all members, so train them with the same data.*")
        if m.num_classes != first.num_classes:
            raise UserError(f"members predict different classes: {first.num_classes} in "
                            f"{first.source}, {m.num_classes} in {m.source}")
        change = class_difference(first.classes, m.classes, first.source, m.source) \
            if first.classes is not None and m.classes is not None else None
        if change:
            raise UserError(f"members were trained on different class folders ({change}); an "
                            "EANN's members must predict the same labels: train them on one "
                            "data set")


def member_record(member: Member, costs: list, result) -> dict[str, Any]:
    return {
        "source": member.source, "step": member.step, "model": member.config.model.name,
        "num_classes": member.num_classes, "config": member.config.to_dict(),
        "exits": [{**c.to_dict(), "top1_error": result.top1[i], "top5_error": result.top5[i]}
                  for i, c in enumerate(costs)],
    }


def eann_budgeted(schedule: list, results: list, points: int) -> list[dict]:
    """The budgeted cascade over the EANN's outputs: an image leaves at the first emitted
    output confident enough; its cost is that output's EANN cost."""
    confidence = torch.stack([results[e.member].confidence[:, e.exit - 1] for e in schedule], 1)
    correct = torch.stack([results[e.member].correct[:, e.exit - 1] for e in schedule], 1)
    curve = budgeted_curve(confidence, correct, [e.macs for e in schedule], points=points)
    return [r.to_dict() for r in curve]


def write_plots(info: dict[str, Any], folder: Path, budgeted: bool) -> dict[str, Path]:
    from pipeline.report import plot_series

    members = info["members"]
    member_macs = [[e["macs"] for e in m["exits"]] for m in members]
    top1 = [[e["top1_error"] for e in m["exits"]] for m in members]
    schedule = info["schedule"]
    frontier = single_member_frontier(member_macs, top1)
    series = [{"label": f"member {j + 1}: {m['model']} {_kwargs(m)}",
               "x": member_macs[j], "y": top1[j], "alpha": 0.6, "markersize": 4}
              for j, m in enumerate(members)]
    # Both staircases hold their last value up to the costliest exit: a larger budget buys
    # nothing more.
    right_end = max(max(costs) for costs in member_macs)
    series.append({"label": "EANN (emitted outputs)", "x": [e["macs"] for e in schedule],
                   "y": [e["top1_error"] for e in schedule], "step": True, "color": "red",
                   "linewidth": 2.5, "marker": "s", "extend_to": right_end})
    series.append({"label": "best single member exit (frontier)", "x": [f[0] for f in frontier],
                   "y": [f[1] for f in frontier], "step": True, "color": "black",
                   "linestyle": "--", "linewidth": 1.2, "marker": "", "extend_to": right_end,
                   "zorder": 3})
    ratio = info["cost_ratio"]
    plots = {"eann_curve.png": plot_series(
        series, folder / "eann_curve.png", log_x=True, ylabel="validation top-1 error (%)",
        title=f"EANN of {len(members)} members: anytime top-1 error "
              f"(C max {ratio['max']:.2f}, mean {ratio['mean']:.2f})")}
    per_output = ratio["per_output"]
    bound = ratio["seed_bound"]
    hlines = [(1.0, "C = 1 (optimal)")]
    if bound is not None:
        hlines.append((bound, f"seed's bound 2 + 1/(b-1) = {bound:.2f} (b = {ratio['b']:.2f})"))
    plots["eann_cost_ratio.png"] = plot_series(
        [{"label": "C at each EANN output", "x": [r["eann_macs"] for r in per_output],
          "y": [r["C"] for r in per_output], "linestyle": ":"}],
        folder / "eann_cost_ratio.png", log_x=True, hlines=hlines,
        xlabel="EANN cost of the output (millions of multiply-adds per image)",
        ylabel="C = EANN cost / best single-member cost", title="measured cost ratio C")
    if budgeted:
        plots["budgeted.png"] = plot_budgeted(
            info["budgeted"], [(e["macs"], e["top1_error"]) for e in schedule],
            folder / "budgeted.png", "EANN: budgeted batch evaluation")
    return plots


def _kwargs(member: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in member["config"]["model"]["kwargs"].items())


def print_report(info: dict[str, Any]) -> None:
    from pipeline.report import format_table

    for j, m in enumerate(info["members"]):
        errors = " ".join(f"{e['top1_error']:.1f}" for e in m["exits"])
        print(f"member {j + 1}: {m['model']} {_kwargs(m)} "
              f"({m['exits'][-1]['macs'] / 1e6:.2f} MMACs, {len(m['exits'])} exits) "
              f"top-1 error per exit: {errors}")
    rows = [{"output": i + 1, "member": e["member"] + 1, "exit": e["exit"],
             "EANN MMACs": e["macs"] / 1e6, "member MMACs": e["member_macs"] / 1e6,
             "top1_err%": e["top1_error"], "top5_err%": e["top5_error"],
             "single MMACs": r["single_macs"] / 1e6, "C": r["C"]}
            for i, (e, r) in enumerate(zip(info["schedule"], info["cost_ratio"]["per_output"]))]
    print(f"EANN schedule on {info['val']['data']} ({info['val']['samples']} images); "
          "'single MMACs': cheapest single-member exit with at most this error:")
    print(format_table(rows, list(rows[0])))
    ratio = info["cost_ratio"]
    bound = (f"seed's bound 2 + 1/(b-1) = {ratio['seed_bound']:.3f} for b = {ratio['b']:.2f}"
             if ratio["seed_bound"] is not None else "no bound: the members do not grow in cost")
    print(f"cost ratio C: max {ratio['max']:.3f}, mean {ratio['mean']:.3f}; {bound}")
    if "budgeted" in info:
        print_budgeted(info["budgeted"])
