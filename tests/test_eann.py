"""EANN assembly, evaluation and budgeted inference, end to end on real images.

Three CIFAR-style ResNet-ANNs whose unit counts double (depths 8, 14, 26: 1, 2, 4 units per
stage) are trained by the real `python -m pipeline train` CLI on scikit-learn's digits stored as
JPEGs, then evaluated, assembled and queried through the real `eval` / `assemble` CLIs and the
inference API.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCHRUN
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from pipeline.__main__ import main
from pipeline.anytime.budgeted import apply_cascade, budgeted_curve, fit_thresholds
from pipeline.config import config_from_dict
from pipeline.data import build_loader
from pipeline.data.listing import index_split
from pipeline.eann import EANN, build_schedule, cost_ratios
from pipeline.eann.schedule import depth_ratio, seed_bound, single_member_frontier
from pipeline.errors import UserError
from pipeline.evaluation import load_member
from pipeline.storage.checkpoints import CheckpointStore

DEMO = "configs/demo_fmnist_resnet_ann.yaml"
DEPTHS = (8, 14, 26)  # 1, 2, 4 units per stage: each member twice as deep as the one before


def cli(*args: str, runner: tuple[str, ...] = (sys.executable, "-m", "pipeline"),
        timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*runner, *args], capture_output=True, text=True, timeout=timeout)


def member_overrides(data: Path, out: Path, depth: int) -> list[str]:
    return [f"data.root={data}", f"out_dir={out}", f"name=m{depth}",
            "model.name=resnet_ann_cifar", f"model.kwargs={{depth: {depth}, width: 8}}",
            "data.image_size=16", "data.batch_size=32", "data.workers=0",
            "train.epochs=1", "train.max_steps_per_epoch=25", "train.amp=none",
            "train.log_every=10", "optim.lr=2.0", "loss.alternating=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 digits as 32x32 JPEGs (1,437 train, 360 val)."""
    from pipeline.data.prepare import prepare_digits

    root = tmp_path_factory.mktemp("digits") / "data"
    prepare_digits(root)
    return root


@pytest.fixture(scope="module")
def members(digits, tmp_path_factory) -> list[Path]:
    """Checkpoint folders of the three members, trained side by side by the real CLI."""
    out = tmp_path_factory.mktemp("members")
    # One thread each (conftest's OMP_NUM_THREADS): three trainings side by side.
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", DEMO,
                               *member_overrides(digits, out, d)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for d in DEPTHS]
    for p in procs:
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log
    return [out / f"m{d}" / "checkpoints" for d in DEPTHS]


@pytest.fixture(scope="module")
def assembled(members, digits, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("eann") / "eann"
    # Out of cost order on purpose, one as a run folder and one as a single checkpoint.
    step = CheckpointStore(str(members[2])).latest_valid().name
    urls = [str(members[2] / step), str(members[0].parent), str(members[1])]
    proc = cli("assemble", "--members", *urls, "--val", str(digits), "--out", str(out),
               "--budgeted", "5", "data.workers=0")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def val_batch(digits: Path, members: list[Path], n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = load_member(str(members[0])).config
    cfg.data.root, cfg.data.batch_size, cfg.data.workers = str(digits), n, 0
    return next(iter(build_loader(cfg.data, "val", train=False)))


# --- the schedule on numbers worked out by hand -------------------------------------------------


def test_schedule_emits_only_improvements_and_charges_what_ran():
    macs = [[10, 20, 30], [25, 50, 100], [100, 200, 400]]
    top1 = [[50.0, 40.0, 41.0], [45.0, 30.0, 32.0], [35.0, 20.0, 10.0]]
    top5 = [[e / 2 for e in m] for m in top1]
    schedule = build_schedule(macs, top1, top5)
    got = [(e.member, e.exit, e.macs, e.member_macs, e.top1_error) for e in schedule]
    # member 0 runs to exit 2 (exit 3 is worse): 20 spent; member 1 exit 1 (45) does not
    # improve on 40, exit 2 does; member 2's exit 1 (35) does not beat 30.
    assert got == [(0, 1, 10, 10, 50.0), (0, 2, 20, 20, 40.0), (1, 2, 70, 50, 30.0),
                   (2, 2, 270, 200, 20.0), (2, 3, 470, 400, 10.0)]
    ratios = cost_ratios(schedule, macs, top1)
    assert [r["single_macs"] for r in ratios] == [10, 20, 50, 200, 400]
    assert [r["C"] for r in ratios] == [1.0, 1.0, 70 / 50, 270 / 200, 470 / 400]
    assert single_member_frontier(macs, top1) == [(10, 50.0), (20, 40.0), (50, 30.0),
                                                  (200, 20.0), (400, 10.0)]
    assert depth_ratio(macs) == pytest.approx(math.sqrt(400 / 30))
    assert seed_bound(2.0) == 3.0


def test_a_member_that_never_improves_is_never_run():
    schedule = build_schedule([[10, 20], [15, 30], [40, 80]], [[30.0, 20.0], [25.0, 21.0],
                                                               [19.0, 5.0]], [[0, 0]] * 3)
    assert [(e.member, e.exit, e.macs) for e in schedule] == [(0, 1, 10), (0, 2, 20),
                                                               (2, 1, 60), (2, 2, 100)]


def test_budgeted_thresholds_hit_the_target_cost():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(2000, 4, generator=g).sort(dim=1).values  # later exits surer
    costs = [1.0, 2.0, 4.0, 8.0]
    for target in (1.0, 2.5, 5.0, 8.0):
        thresholds, achieved = fit_thresholds(confidence, costs, target)
        leave = apply_cascade(confidence, thresholds)
        assert achieved == pytest.approx(torch.tensor(costs)[leave].mean().item())
        assert achieved == pytest.approx(target, abs=0.1)
    correct = confidence > 0.5
    curve = budgeted_curve(confidence, correct, costs, points=5)
    assert [r.target_cost for r in curve] == [1.0, 2.75, 4.5, 6.25, 8.0]
    assert all(abs(r.cost - r.target_cost) < 0.3 for r in curve)
    assert curve[0].exit_fractions[0] == pytest.approx(1.0, abs=0.01)
    assert curve[-1].exit_fractions[-1] == pytest.approx(1.0, abs=0.01)


# --- the assembly stage on three trained members -----------------------------------------------


@pytest.mark.slow  # uses the trained members
def test_assemble_writes_a_monotone_schedule_report_and_plots(assembled, members):
    out, proc = assembled
    info = json.loads((out / "eann.json").read_text())
    # run order is cost order whatever the command line said
    assert [m["model"] for m in info["members"]] == ["resnet_ann_cifar"] * 3
    assert [m["config"]["model"]["kwargs"]["depth"] for m in info["members"]] == list(DEPTHS)
    assert [len(m["exits"]) for m in info["members"]] == [3, 6, 12]
    full = [m["exits"][-1]["macs"] for m in info["members"]]
    assert full[0] < full[1] < full[2]

    schedule = info["schedule"]
    assert schedule, "no output emitted"
    errors = [e["top1_error"] for e in schedule]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # strictly better each time
    assert all(a["macs"] < b["macs"] for a, b in zip(schedule, schedule[1:]))
    for e in schedule:  # every emitted output is exactly its member exit's measured error
        assert e["top1_error"] == info["members"][e["member"]]["exits"][e["exit"] - 1][
            "top1_error"]
    # recompute the schedule from the members' exits: the rule of SPEC section 3
    macs = [[x["macs"] for x in m["exits"]] for m in info["members"]]
    top1 = [[x["top1_error"] for x in m["exits"]] for m in info["members"]]
    top5 = [[x["top5_error"] for x in m["exits"]] for m in info["members"]]
    assert [e.to_dict() for e in build_schedule(macs, top1, top5)] == schedule
    ratio = info["cost_ratio"]
    assert all(r["C"] >= 1 for r in ratio["per_output"])
    assert ratio["max"] == max(r["C"] for r in ratio["per_output"])
    assert ratio["seed_bound"] == pytest.approx(2 + 1 / (ratio["b"] - 1))
    assert 1.5 < ratio["b"] < 2.5  # units double; stem and heads keep b a little above 2

    assert "EANN MMACs" in proc.stdout and "cost ratio C: max" in proc.stdout
    assert "seed's bound 2 + 1/(b-1)" in proc.stdout and "budgeted" in proc.stdout
    for name in ("eann_curve.png", "eann_cost_ratio.png", "budgeted.png"):
        assert (out / name).stat().st_size > 10_000, name
    budgeted = info["budgeted"]
    assert len(budgeted) == 5
    assert budgeted[0]["cost"] <= budgeted[-1]["cost"]
    assert schedule[0]["macs"] <= min(r["cost"] for r in budgeted)
    assert max(r["cost"] for r in budgeted) <= schedule[-1]["macs"]


@pytest.mark.slow  # uses the trained members
def test_artifact_is_safetensors_and_holds_the_members_weights(assembled, members):
    out, _ = assembled
    path = out / "eann.safetensors"
    raw = path.read_bytes()
    # safetensors: an 8-byte header length, then a JSON header; no zip, no pickle anywhere
    assert not zipfile.is_zipfile(path)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "anytime-pipeline-eann/1"
    eann = EANN.load(str(out))
    assert eann.info == json.loads((out / "eann.json").read_text())
    for j, ckpt in enumerate(members):
        state = CheckpointStore(str(ckpt)).load_latest_valid()[1]["model"]  # weights_only=True
        mine = eann.members[j].state_dict()
        assert mine.keys() == state.keys()
        assert all(torch.equal(mine[k], state[k]) for k in state)


@pytest.mark.slow  # uses the trained members
def test_iter_predictions_are_the_member_exits_and_nothing_runs_twice(assembled, members,
                                                                       digits):
    out, _ = assembled
    eann = EANN.load(str(out) + "/eann.safetensors")
    x, _ = val_batch(digits, members)
    standalone = [load_member(str(m)).model for m in members]
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = list(eann.iter_predictions(x))
    assert [(o.member, o.exit, o.macs) for o in outputs] == [
        (e.member, e.exit, e.macs) for e in eann.schedule]
    with torch.no_grad():
        for o in outputs:
            assert torch.equal(o.logits, standalone[o.member](x)[o.exit - 1])
    # exactly the multiply-adds the schedule promises for the last output: each member ran once,
    # up to its last emitted exit
    assert counter.get_total_flops() // 2 == eann.schedule[-1].macs * x.shape[0]


@pytest.mark.slow  # uses the trained members
def test_predict_never_exceeds_its_budget(assembled, members, digits):
    out, _ = assembled
    eann = EANN.load(str(out))
    x, _ = val_batch(digits, members, n=8)
    standalone = [load_member(str(m)).model for m in members]
    costs = sorted({e.macs for e in eann.schedule} | {e.member_macs for e in eann.schedule})
    budgets = [c + d for c in costs for d in (-1, 0)] + [10 * costs[-1]]
    for mode in ("anytime", "best"):
        for budget in budgets:
            if budget < costs[0]:
                with pytest.raises(UserError, match="below the cheapest output"):
                    eann.predict(x, budget, mode=mode)
                continue
            counter = FlopCounterMode(display=False)
            with counter:
                o = eann.predict(x, budget, mode=mode)
            spent = counter.get_total_flops() // 2 / x.shape[0]
            assert spent == o.macs <= budget, (mode, budget)
            with torch.no_grad():
                assert torch.equal(o.logits, standalone[o.member](x)[o.exit - 1])
            if mode == "anytime":  # the output the EANN has emitted by this budget
                emitted = [e for e in eann.schedule if e.macs <= budget][-1]
                assert (o.member, o.exit) == (emitted.member, emitted.exit)
            else:  # no single member exit that fits has a lower validation error
                fitting = [ex["top1_error"] for m in eann.info["members"] for ex in m["exits"]
                           if ex["macs"] <= budget]
                assert o.top1_error == min(fitting)

    # Budgets in milliseconds: the measured table is noisy (no timing is asserted), but the
    # schedule's times follow from it by the same rule as multiply-adds, and predict picks the
    # best output emitted within the time.
    table = eann.measure_latency(batch_size=2, repeats=1, warmup=0)
    member_ms = table["member_ms"]
    assert [len(r) for r in member_ms] == [3, 6, 12]
    expected, spent = [], 0.0
    for j in range(3):
        expected += [spent + member_ms[j][e.exit - 1] for e in eann.schedule if e.member == j]
        spent += member_ms[j][eann.last_exit[j] - 1] if eann.last_exit[j] else 0.0
    assert table["schedule_ms"] == expected
    for i, ms in enumerate(table["schedule_ms"]):
        o = eann.predict(x, budget_ms=ms)
        chosen = max(k for k, t in enumerate(table["schedule_ms"]) if t <= ms)
        assert chosen >= i and (o.member, o.exit) == (eann.schedule[chosen].member,
                                                       eann.schedule[chosen].exit)


# --- eval --------------------------------------------------------------------------------------


def recount(checkpoint: Path, data: Path) -> tuple[list[float], list[float], int]:
    """Per-exit top-1 / top-5 error counted image by image: PIL decode and resize, normalise,
    rank each image's logits; no loader, transform, sampler or metrics class of the pipeline."""
    import timm

    import pipeline.models  # noqa: F401  (registers the models with timm)

    store = CheckpointStore(str(checkpoint))
    info = store.latest_valid()
    state = store.load(info)
    cfg = config_from_dict(info.meta["config"])
    model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    model.load_state_dict(state["model"])
    model.eval()
    size = cfg.data.image_size
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    index = index_split(data, "val")
    images = []
    for i in range(len(index)):
        with Image.open(index.path(i)) as im:
            # the digits are 32x32: "small" augmentation resizes them (PIL bilinear)
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
        images.append((pixels - mean) / std)
    labels = index.labels.tolist()
    top1 = [0] * model.num_exits
    top5 = [0] * model.num_exits
    with torch.no_grad():
        for k, logits in enumerate(model(torch.stack(images))):
            for row, label in zip(logits, labels):
                ranked = row.argsort(descending=True).tolist()
                top1[k] += ranked[0] == label
                top5[k] += label in ranked[:5]
    n = len(index)
    return [100 * (1 - c / n) for c in top1], [100 * (1 - c / n) for c in top5], n


@pytest.mark.slow  # uses the trained members
def test_eval_cli_matches_an_independent_recount(members, digits, tmp_path):
    proc = cli("eval", "--checkpoint", str(members[1]), "--data", str(digits), "--out",
               str(tmp_path / "eval"), "--json", "--budgeted", "4", "data.batch_size=50",
               "data.workers=0")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (tmp_path / "eval" / "eval_curve.png").stat().st_size > 10_000
    assert (tmp_path / "eval" / "budgeted.png").stat().st_size > 10_000
    top1, top5, n = recount(members[1], digits)
    assert report["samples"] == n == 360
    assert [e["top1_error"] for e in report["exits"]] == pytest.approx(top1, abs=1e-9)
    assert [e["top5_error"] for e in report["exits"]] == pytest.approx(top5, abs=1e-9)
    model = load_member(str(members[1])).model
    from pipeline.models import exit_costs

    assert [e["macs"] for e in report["exits"]] == [c.macs for c in exit_costs(model,
                                                                                (3, 16, 16))]
    assert len(report["budgeted"]) == 4

    # the same under DDP: two CPU processes, each half the images, gathered on rank 0
    ddp = cli("eval", "--checkpoint", str(members[1]), "--data", str(digits), "--out",
              str(tmp_path / "ddp"), "--json", "--budgeted", "4", "data.batch_size=50",
              "data.workers=0", runner=(*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m",
                                        "pipeline"))
    assert ddp.returncode == 0, ddp.stderr
    ddp_report = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert ddp_report["samples"] == 360
    assert [e["top1_error"] for e in ddp_report["exits"]] == pytest.approx(top1, abs=1e-9)
    # per-image records come back in the single-process order: the same budgeted results,
    # point by point (pytest.approx compares flat values only, so field by field)
    assert len(ddp_report["budgeted"]) == len(report["budgeted"])
    for got, want in zip(ddp_report["budgeted"], report["budgeted"]):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (key, got[key], value)


# --- object storage and bad input --------------------------------------------------------------


@pytest.mark.slow  # uses the trained members
def test_members_from_s3_and_artifact_to_s3(members, digits, s3_server, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for d, ckpt in zip(DEPTHS[:2], members[:2]):
        fs.put(str(ckpt), f"{s3_bucket}/runs/m{d}/checkpoints", recursive=True)
    out = f"{s3_bucket}/eann"
    rc = main(["assemble", "--members", f"{s3_bucket}/runs/m8/checkpoints",
               f"{s3_bucket}/runs/m14", "--val", str(digits), "--out", out,
               "--endpoint-url", s3_server, "data.workers=0"])
    assert rc == 0
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(out)} == {
        "eann.safetensors", "eann.json", "eann_curve.png", "eann_cost_ratio.png"}
    eann = EANN.load(out, endpoint_url=s3_server)
    assert len(eann.members) == 2 and eann.info["members"][0]["source"].startswith("s3://")


@pytest.mark.slow  # uses the trained members
def test_bad_input_is_one_line(members, digits, make_image_folder, tmp_path, capsys):
    three_classes = make_image_folder("three", size=16)
    cases = [
        (["assemble", "--members", str(tmp_path / "nothing"), "--val", str(digits), "--out",
          str(tmp_path / "o")], "no valid checkpoint"),
        (["eval", "--checkpoint", str(members[0]), "--data", str(three_classes)],
         "has other class folders than"),
        (["eval", "--checkpoint", str(members[0] / "step-00000099"), "--data", str(digits)],
         "no checkpoint"),
        # evaluated and printed, but its files cannot be written there
        (["eval", "--checkpoint", str(members[0]), "--data", str(digits), "--out",
          "/proc/no-such-place", "data.workers=0"],
         "the evaluation above could not be written to /proc/no-such-place"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    # a truncated artifact is refused with a clear message, not a crash
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(["assemble", "--members", str(members[0]), "--val", str(digits), "--out",
                 str(whole), "data.workers=0"]) == 0
    data = (whole / "eann.safetensors").read_bytes()
    broken.mkdir()
    (broken / "eann.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        EANN.load(str(broken))


@pytest.mark.slow  # uses the trained members
def test_slurm_script_runs_the_assembly(members, digits, tmp_path):
    """The sbatch script itself, run as a plain shell script (outside SLURM it skips srun)."""
    env = {**os.environ, "MEMBERS": f"{members[0]} {members[1]}", "VAL_DIR": str(digits),
           "OUT_URL": str(tmp_path / "eann"), "BUDGETED": "0", "PYTHON": sys.executable}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", "slurm/eann_assemble.sh", "data.workers=0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    info = json.loads((tmp_path / "eann" / "eann.json").read_text())
    assert len(info["members"]) == 2 and "budgeted" not in info
    missing = subprocess.run(["bash", "slurm/eann_assemble.sh"], env={**env, "MEMBERS": ""},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "set MEMBERS" in missing.stderr
