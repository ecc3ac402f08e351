"""`torch.export` of trained networks and EANNs (pipeline/export.py, `python -m pipeline export`):
the exported program gives the eager outputs for every family at any batch size, keeps only what
`until` needs, and travels through a file and the local S3 server with what a server needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import timm
import torch
from conftest import payload_path, write_image_folder
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.eann import EANN
from pipeline.eann.schedule import ScheduleEntry
from pipeline.errors import UserError
from pipeline.evaluation import load_member
from pipeline.export import META, export_model, load_exported, save_exported
from pipeline.models import create_anytime_model, exit_costs
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.train.trainer import train

# One of each family, small enough to export in a few seconds on 2 cores. The MSDNets keep their
# family's structure (scales, dense layers, transitions, heads) with fewer and narrower layers.
FAMILIES = [
    ("resnet_ann_cifar20", 32, {}),
    ("resnet18_ann", 64, {}),
    ("resnet18_opt", 64, {}),
    ("msdnet_cifar", 32, {"blocks": 3, "base": 1, "step": 1}),
    ("msdnet26", 64, {"base": 2, "step": 2, "channels": 8, "growth": 4}),
]
# 3 classes x 12 training images, batch 4: a real run of 3 steps with a checkpoint at its end.
TINY = ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 4}", "data.image_size=32",
        "data.augment=small", "data.batch_size=4", "data.workers=0", "train.epochs=1",
        "train.max_steps_per_epoch=3", "train.log_every=3", "checkpoint.async_save=false",
        "name=tiny"]


def outputs_equal(got: tuple, expected: list) -> None:
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def one_line_error(capsys, argv: list[str], words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of a real short training run."""
    base = tmp_path_factory.mktemp("export")
    data = write_image_folder(base / "data")
    train(load_config(None, [f"data.root={data}", f"out_dir={base / 'runs'}", *TINY]))
    return data, base / "runs" / "tiny"


@pytest.fixture(scope="module")
def assembled(trained, tmp_path_factory) -> Path:
    """An EANN of the trained run and a deeper, untrained member, by the real `assemble`."""
    data, run = trained
    cfg = load_member(str(run)).config
    cfg.model.kwargs = {"depth": 14, "width": 4}
    deeper = tmp_path_factory.mktemp("deeper") / "checkpoints"
    model = create_anytime_model(cfg.model.name, 3, **cfg.model.kwargs)
    CheckpointStore(str(deeper)).save(1, {"model": model.state_dict()},
                                      meta={"config": cfg.to_dict()})
    out = tmp_path_factory.mktemp("eann") / "eann"
    assert main(["assemble", "--members", str(deeper), str(run), "--val", str(data), "--out",
                 str(out), "data.workers=0"]) == 0
    return out


# --- the exported program against eager ---------------------------------------------------------


@pytest.mark.parametrize("name, size, kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_exported_outputs_equal_eager_at_any_batch_size(name, size, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    program = export_model(model, torch.randn(2, 3, size, size))
    served = program.module()
    with torch.no_grad():
        for batch in (1, 3):  # neither is the traced batch of 2
            x = torch.randn(batch, 3, size, size)
            outputs_equal(served(x), model(x))


def test_until_keeps_the_first_exits_and_computes_only_what_they_need():
    torch.manual_seed(0)
    model = timm.create_model("resnet_ann_cifar20", num_classes=10)  # in training mode
    program = export_model(model, torch.randn(1, 3, 32, 32), until=3)  # a batch of 1 to trace
    assert model.training  # export_model evaluates in eval mode and gives the model back as it was
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    outputs, flops = [], []
    with torch.no_grad():
        for run in (program.module(), lambda x: model(x, until=3), model):
            with FlopCounterMode(display=False) as counter:
                outputs.append(run(x))
            flops.append(counter.get_total_flops())
    outputs_equal(outputs[0], outputs[1])
    assert len(outputs[2]) == 9 and flops[0] == flops[1] < flops[2]


def tiny_eann() -> EANN:
    torch.manual_seed(0)
    members = [timm.create_model("resnet_ann_cifar", depth=d, width=4, num_classes=5).eval()
               for d in (8, 14)]  # 3 and 6 exits
    # member 0 emits exits 1 and 3 (2 skipped), member 1 exits 2 and 6
    entries = [(0, 1, 10), (0, 3, 30), (1, 2, 50), (1, 6, 90)]
    schedule = [ScheduleEntry(j, k, macs, macs, 50.0 - i, 20.0 - i)
                for i, (j, k, macs) in enumerate(entries)]
    return EANN(members, schedule)


def test_eann_export_is_its_schedule_of_predictions():
    eann = tiny_eann()
    program = export_model(eann, torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 16, 16)
            outputs_equal(program.module()(x), [o.logits for o in eann.iter_predictions(x)])
    # the first two outputs need member 0 alone: member 1's weights are not in the program
    first = export_model(eann, torch.randn(2, 3, 16, 16), until=2)
    assert {k.split(".", 2)[1] for k in first.state_dict} == {"0"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outputs_equal(first.module()(x), [o.logits for o in eann.iter_predictions(x)][:2])


# --- the CLI on a trained run and an assembled EANN; files and S3 ------------------------------


def test_cli_exports_a_trained_run_that_a_server_loads_from_a_file(trained, tmp_path):
    _, run = trained
    out = tmp_path / "deploy" / "tiny.pt2"  # the folder does not exist yet
    assert main(["export", str(run), "--out", str(out)]) == 0
    # what the docs tell a server to do, with torch alone
    files = {META: ""}
    served = torch.export.load(str(out), extra_files=files).module()
    meta = json.loads(files[META])
    member = load_member(str(run))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs_equal(served(x), member.model(x))
    cfg = member.config
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["num_classes"] == 3
    assert meta["input"]["size"] == [3, 32, 32]
    assert meta["input"]["mean"] == list(cfg.data.mean) and meta["input"]["std"] == list(
        cfg.data.std)
    costs = exit_costs(member.model, (3, 32, 32))
    assert [(o["exit"], o["position"], o["macs"]) for o in meta["outputs"]] == [
        (c.index, c.position, c.macs) for c in costs]
    assert meta["source"] == member.source and meta["step"] == member.step == 3
    assert meta["batch"] is None and meta["kind"] == "model"


def test_cli_export_to_s3_with_until_and_a_fixed_batch(trained, s3_server, s3_bucket, capsys):
    _, run = trained
    url = f"{s3_bucket}/deploy/tiny-2.pt2"
    assert main(["export", str(run), "--out", url, "--until", "2", "--batch", "4",
                 "--endpoint-url", s3_server]) == 0
    printed = capsys.readouterr().out
    assert "2 outputs" in printed and "batch 4" in printed and "stage2.unit1" in printed
    program, meta = load_exported(url, endpoint_url=s3_server)
    assert meta["batch"] == 4 and [o["exit"] for o in meta["outputs"]] == [1, 2]
    model = load_member(str(run)).model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outputs_equal(program.module()(x), model(x, until=2))
        with pytest.raises(Exception, match="4"):  # a static batch: another size is refused
            program.module()(torch.randn(3, 3, 32, 32))


def test_cli_exports_an_assembled_eann(assembled, s3_server, s3_bucket, capsys):
    url = f"{s3_bucket}/eann.pt2"
    assert main(["export", str(assembled), "--eann", "--out", url, "--endpoint-url",
                 s3_server]) == 0
    printed = capsys.readouterr().out
    program, meta = load_exported(url, endpoint_url=s3_server)
    assert meta["kind"] == "eann" and f"{len(meta['outputs'])} outputs" in printed
    eann = EANN.load(str(assembled))
    assert [(o["member"], o["exit"], o["macs"]) for o in meta["outputs"]] == [
        (e.member, e.exit, e.macs) for e in eann.schedule]
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["input"]["size"] == [3, 32, 32]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs_equal(program.module()(x), [o.logits for o in eann.iter_predictions(x)])


def test_save_and_load_round_trip_through_the_library(tmp_path):
    model = timm.create_model("resnet_ann_cifar", depth=8, width=4, num_classes=3).eval()
    program = export_model(model, torch.randn(2, 3, 16, 16))
    meta = {"outputs": [{"exit": 1}]}
    url = save_exported(f"file://{tmp_path}/m.pt2", program, meta)
    loaded, got = load_exported(url)
    assert got == meta
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        outputs_equal(loaded.module()(x), model(x))


# --- bad input: one line naming the fix ---------------------------------------------------------


def test_bad_input_is_one_line(trained, tmp_path, capsys):
    _, run = trained
    out = str(tmp_path / "m.pt2")
    one_line_error(capsys, ["export", str(run), "--out", out, "--until", "4"],
                   "until 4 is not one of the 3 exits of ResNetANN: give 1..3 (--until K)")
    one_line_error(capsys, ["export", str(tmp_path / "nothing"), "--out", out],
                   "no valid checkpoint at")
    one_line_error(capsys, ["export", str(run), "--eann", "--out", out],
                   "no EANN artifact at")
    # a checkpoint whose payload was cut short, named as one step folder
    copy = tmp_path / "copy"
    shutil.copytree(run / "checkpoints", copy)
    step = CheckpointStore(str(copy)).latest_valid().name
    payload = Path(payload_path(fsspec.filesystem("file"), str(copy / step)))
    payload.write_bytes(payload.read_bytes()[:100])
    one_line_error(capsys, ["export", str(copy / step), "--out", out], "is broken")
    # --out below a file: nowhere to write
    (tmp_path / "file").write_text("")
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "file" / "m.pt2")],
                   "cannot write")
    # not an exported program
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable exported program"):
        load_exported(str(tmp_path / "junk.pt2"))
    with pytest.raises(SystemExit) as e:  # argparse: usage and exit 2
        main(["export", str(run), "--out", out, "--until", "0"])
    assert e.value.code == 2 and "is below 1" in capsys.readouterr().err
