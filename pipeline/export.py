"""Deploying a trained network: `torch.export` of its exits, with what a server needs beside it.

    program, meta = export_checkpoint("s3://bucket/runs/r50/checkpoints", until=3)
    save_exported("s3://bucket/deploy/r50.pt2", program, meta, endpoint_url="http://minio:9000")

    # the server (a file you wrote yourself: loading runs pickle, see docs/models.md "Export")
    files = {"anytime.json": ""}
    program = torch.export.load("r50.pt2", extra_files=files)
    logits = program.module()(x)       # tuple: exits 1..until, first to last (any batch size)
    meta = json.loads(files["anytime.json"])  # per output its cost; classes; input size/mean/std

An exported EANN's outputs are its schedule's, in order: exactly the logits that
`EANN.iter_predictions` yields (each member runs once, up to its last exit among them). `until=K`
keeps the first K scheduled outputs, and only the members those need are in the graph.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import torch
from torch import nn

from pipeline.eann.model import EANN
from pipeline.errors import UserError
from pipeline.storage.atomic import is_local, write_atomically
from pipeline.storage.urls import open_url

META = "anytime.json"  # the extra file of the .pt2 archive that holds `export_meta`
FORMAT = "anytime-pipeline-export/1"


class Exits(nn.Module):
    """What is exported of one network: exits 1..until of `model(x, until)`, as a tuple so that
    the graph's outputs have a fixed number the server can unpack."""

    def __init__(self, model: nn.Module, until: int):
        super().__init__()
        self.model = model
        self.until = until

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x, until=self.until))


class ScheduledOutputs(nn.Module):
    """What is exported of an EANN: its first `until` scheduled outputs, in the schedule's order,
    as `EANN.iter_predictions` computes them. Members no kept output needs are left out, so
    their weights are not in the file."""

    def __init__(self, eann: EANN, until: int):
        super().__init__()
        entries = eann.schedule[:until]
        used = sorted({e.member for e in entries})
        self.members = nn.ModuleList(eann.members[j] for j in used)
        # per kept member: how far it runs, and which of its exits are emitted (schedule order)
        self.last_exit = [max(e.exit for e in entries if e.member == j) for j in used]
        self.emitted = [[e.exit for e in entries if e.member == j] for j in used]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for member, last, emitted in zip(self.members, self.last_exit, self.emitted):
            logits = member(x, until=last)
            out.extend(logits[k - 1] for k in emitted)
        return tuple(out)


def export_model(model: nn.Module, example_input: torch.Tensor, until: int | None = None,
                 dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of an anytime network (exits 1..until) or an EANN (scheduled outputs
    1..until), in eval mode; `until=None` keeps all. The program returns a tuple of logits,
    first to last. With `dynamic_batch` one program serves any batch size, else only
    `example_input`'s."""
    wrapped = (ScheduledOutputs(model, check_until(model, until)) if isinstance(model, EANN)
               else Exits(model, check_until(model, until)))
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export turns a dimension of size 1 into the constant 1 (and refuses to call it
        # dynamic): trace with two images so that the batch is a symbol, valid from 1 upwards.
        if example_input.shape[0] < 2:
            example_input = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    was_training = model.training
    model.eval()  # BatchNorm's running statistics, no dropout: what a server computes
    try:
        return torch.export.export(wrapped, (example_input,), dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)


def check_until(model: nn.Module, until: int | None) -> int:
    """`until` as the number of outputs to keep, or one line naming the valid range."""
    if isinstance(model, EANN):
        count, what = len(model.schedule), "scheduled outputs of this EANN"
    else:
        count, what = model.num_exits, f"exits of {type(model).__name__}"
    if until is None:
        return count
    if not 1 <= until <= count:
        raise UserError(f"until {until} is not one of the {count} {what}: give 1..{count} "
                        "(--until K), or leave it out to keep every one")
    return until


def export_checkpoint(url: str, *, until: int | None = None, eann: bool = False,
                      endpoint_url: str = "", batch: int | None = None,
                      ) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The exported program and its `export_meta` for a checkpoint (a run folder, its
    checkpoints folder or one step-XXXXXXXX folder) or, with `eann`, an EANN artifact. `batch`
    fixes the batch size; None: any."""
    if eann:
        model = EANN.load(url, endpoint_url)
        info = model.info
        size, mean, std, classes = (info["image_size"], info["data"]["mean"],
                                    info["data"]["std"], info.get("classes"))
        about = {"source": url, "model": "eann",
                 "members": [m["source"] for m in info["members"]]}
    else:
        from pipeline.evaluation import load_member

        member = load_member(url, endpoint_url)
        model, data = member.model, member.config.data
        size, mean, std, classes = data.image_size, data.mean, data.std, member.classes
        about = {"source": member.source, "model": member.config.model.name,
                 "step": member.step}
    until = check_until(model, until)
    channels = _in_chans(model)
    example = torch.randn(batch or 2, channels, size, size)
    program = export_model(model, example, until, dynamic_batch=batch is None)
    meta = export_meta(model, until, (channels, size, size), mean, std, classes)
    return program, {"format": FORMAT, **about, "batch": batch, **meta}


def export_meta(model: nn.Module, until: int, input_size: tuple[int, int, int],
                mean: Any, std: Any, classes: Any = None) -> dict[str, Any]:
    """What a server needs beside the graph, JSON-safe: per output where it sits and its
    cumulative multiply-adds per image; the input size and normalisation; the class names."""
    if isinstance(model, EANN):
        members = model.info.get("members")  # absent in an EANN built in code, not assembled
        outputs = [{"member": e.member, "exit": e.exit,
                    "position": members[e.member]["exits"][e.exit - 1]["position"]
                    if members else None,
                    "macs": e.macs, "top1_error": e.top1_error, "top5_error": e.top5_error}
                   for e in model.schedule[:until]]
    else:
        from pipeline.models import exit_costs

        outputs = [{"exit": c.index, "position": c.position, "macs": c.macs}
                   for c in exit_costs(model, input_size)[:until]]
    return {
        "format": FORMAT,
        "kind": "eann" if isinstance(model, EANN) else "model",
        "outputs": outputs,
        "cost_unit": "multiply-adds per image, cumulative: everything computed before this "
                     "output (every earlier exit head of a member; for an EANN, the earlier "
                     "members up to their last emitted exit)",
        "input": {"size": list(input_size), "mean": list(mean), "std": list(std),
                  "layout": "NCHW float32: RGB in [0, 1], then (x - mean) / std"},
        "num_classes": _num_classes(model),
        "classes": list(classes) if classes is not None else None,
        "torch": torch.__version__,
    }


def _in_chans(model: nn.Module) -> int:
    """Image channels: the input width of the first convolution."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels


def _num_classes(model: nn.Module) -> int:
    return model.members[0].num_classes if isinstance(model, EANN) else model.num_classes


def save_exported(url: str, program: torch.export.ExportedProgram, meta: dict[str, Any], *,
                  endpoint_url: str = "") -> str:
    """Write the program with `meta` as its extra file `anytime.json` to `url` (a path, s3://
    ...), whole or not at all (a local file is renamed into place, an object is one PUT)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META: json.dumps(meta, indent=1)})
    fs, path = open_url(url, endpoint_url, what="--out")
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_atomically(path, buffer.getvalue())
        else:
            fs.pipe_file(path, buffer.getvalue())
    except OSError as e:  # PermissionError, a missing bucket, a server that is down
        raise UserError(f"cannot write {url}: {type(e).__name__}: {e}; check the path, its "
                        "permissions and, for S3, --endpoint-url and credentials") from e
    return url


def load_exported(url: str, *, endpoint_url: str = "",
                  ) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program and meta written by `save_exported`. Loading runs pickle on parts of the
    file (torch.export.load), so open only files you wrote: see docs/models.md "Export"."""
    fs, path = open_url(url, endpoint_url, what="exported model")
    try:
        data = fs.cat_file(path)
    except OSError as e:
        raise UserError(f"cannot read {url}: {type(e).__name__}: {e}") from e
    files = {META: ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=files)
    except (RuntimeError, zipfile.BadZipFile) as e:
        raise UserError(f"{url} is not a readable exported program ({e}); it is truncated, "
                        "corrupt or not a .pt2 file: export it again") from e
    if not files[META]:
        raise UserError(f"{url} holds no {META}: it was not written by `python -m pipeline "
                        "export`")
    return program, json.loads(files[META])
