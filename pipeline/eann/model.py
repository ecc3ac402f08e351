"""The EANN at inference: members in order of cost, and the schedule of outputs to emit.

    eann = EANN.load("s3://bucket/eann/r3", endpoint_url="http://minio:9000").to("cuda")
    for out in eann.iter_predictions(x):      # anytime: each refined prediction, in order
        out.logits, out.macs                  # cumulative multiply-adds per image so far
    out = eann.predict(x, budget_macs=40e6)   # the EANN's answer at that budget
    eann.measure_latency(batch_size=64)       # per-device table, then budgets in milliseconds:
    out = eann.predict(x, budget_ms=3.5)

Within a member, `forward(x, until=k)` returns exits 1..k together (the protocol has no
step-wise forward), so a member's outputs are yielded when it has run to its last emitted exit;
each carries the cost at which it exists in the network.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.config import config_from_dict
from pipeline.eann.artifact import read_artifact
from pipeline.eann.schedule import ScheduleEntry
from pipeline.errors import UserError


@dataclass
class AnytimeOutput:
    logits: torch.Tensor
    member: int  # 0-based member, in run order
    exit: int  # 1-based exit of that member
    macs: int  # multiply-adds per image spent to get here (see EANN.predict / iter_predictions)
    top1_error: float  # this output's validation error (%), as measured at assembly


class EANN(nn.Module):
    def __init__(self, members: list[nn.Module], schedule: list[ScheduleEntry],
                 info: dict[str, Any] | None = None):
        super().__init__()
        if not schedule:
            raise ValueError("an EANN needs at least one scheduled output")
        self.members = nn.ModuleList(members)
        self.schedule = schedule
        self.info = info or {}
        self.latency: dict[str, Any] | None = None
        # per member, its last emitted exit (0: the member is never run)
        self.last_exit = [max((e.exit for e in schedule if e.member == j), default=0)
                          for j in range(len(members))]
        self.eval()

    @classmethod
    def load(cls, url: str, endpoint_url: str = "",
             map_location: str | torch.device = "cpu") -> EANN:
        """The artifact written by `python -m pipeline assemble` (its folder or file URL)."""
        from pipeline.models import create_anytime_model

        tensors, info = read_artifact(url, endpoint_url)
        members = []
        for j, m in enumerate(info["members"]):
            model_cfg = config_from_dict(m["config"]).model
            model = create_anytime_model(model_cfg.name, m["num_classes"], **model_cfg.kwargs)
            prefix = f"members.{j}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            model.load_state_dict(state)
            members.append(model)
        schedule = [ScheduleEntry(**e) for e in info["schedule"]]
        return cls(members, schedule, info).to(map_location)

    @torch.no_grad()
    def iter_predictions(self, x: torch.Tensor) -> Iterator[AnytimeOutput]:
        """Every scheduled output in order, each with the cumulative cost at which it exists
        (all earlier members up to their last emitted exit + this member up to this exit).
        Each member runs once, up to its last emitted exit; skipped members never run."""
        for j, member in enumerate(self.members):
            if not self.last_exit[j]:
                continue
            logits = member(x, until=self.last_exit[j])
            for e in self.schedule:
                if e.member == j:
                    yield AnytimeOutput(logits[e.exit - 1], j, e.exit, e.macs, e.top1_error)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, budget_macs: float | None = None, *,
                budget_ms: float | None = None,
                mode: Literal["anytime", "best"] = "anytime") -> AnytimeOutput:
        """The best prediction within a budget per image, in multiply-adds or (after
        `measure_latency`) in milliseconds per batch of the measured size.

        mode="anytime": the output the EANN has emitted by that budget (the curve of the
        assembly report). mode="best": the exit of any member with the lowest validation error
        whose own cost fits (the single-member frontier; useful when the budget is known up
        front). Either way only that member runs, up to that exit, so the multiply-adds spent
        (`.macs`) never exceed the budget.
        """
        if (budget_macs is None) == (budget_ms is None):
            raise UserError("give exactly one of budget_macs and budget_ms")
        choices = self._choices(mode, "ms" if budget_ms is not None else "macs")
        budget = budget_ms if budget_ms is not None else budget_macs
        fitting = [c for c in choices if c[0] <= budget]
        if not fitting:
            unit = "ms" if budget_ms is not None else "multiply-adds"
            raise UserError(f"budget {budget:g} {unit} is below the cheapest output "
                            f"({min(c[0] for c in choices):g} {unit}); raise the budget")
        _, error, j, k, member_macs = min(fitting, key=lambda c: (c[1], c[0]))
        logits = self.members[j](x, until=k)[-1]
        return AnytimeOutput(logits, j, k, member_macs, error)

    def _choices(self, mode: str, unit: str) -> list[tuple[float, float, int, int, int]]:
        """(cost in the budget's unit, validation error, member, exit, member-alone macs)."""
        if unit == "ms" and self.latency is None:
            raise UserError("budget_ms needs a latency table: call measure_latency() on this "
                            "device first (or set_latency(table))")
        if mode == "anytime":
            costs = self.latency["schedule_ms"] if unit == "ms" else [e.macs for e in
                                                                      self.schedule]
            return [(c, e.top1_error, e.member, e.exit, e.member_macs)
                    for c, e in zip(costs, self.schedule)]
        if mode == "best":
            out = []
            for j, m in enumerate(self.info["members"]):
                for k, ex in enumerate(m["exits"]):
                    cost = self.latency["member_ms"][j][k] if unit == "ms" else ex["macs"]
                    out.append((cost, ex["top1_error"], j, k + 1, ex["macs"]))
            return out
        raise UserError(f"mode={mode!r} is not one of anytime, best")

    @torch.no_grad()
    def measure_latency(self, batch_size: int = 1, repeats: int = 10,
                        warmup: int = 2) -> dict[str, Any]:
        """Milliseconds per batch for every exit of every member (median of `repeats`), on the
        device the members are on; the schedule's costs in ms follow as for multiply-adds.
        Sets and returns the table (JSON-safe: keep it per device and `set_latency` it)."""
        param = next(self.parameters())
        size = self.info.get("image_size", 224)
        x = torch.randn(batch_size, 3, size, size, device=param.device, dtype=param.dtype)
        cuda = param.device.type == "cuda"
        member_ms = []
        for member in self.members:
            row = []
            for k in range(1, member.num_exits + 1):
                times = []
                for i in range(warmup + repeats):
                    if cuda:
                        torch.cuda.synchronize(param.device)
                    start = time.perf_counter()
                    member(x, until=k)
                    if cuda:
                        torch.cuda.synchronize(param.device)
                    if i >= warmup:
                        times.append(1000 * (time.perf_counter() - start))
                row.append(statistics.median(times))
            member_ms.append(row)
        device = torch.cuda.get_device_name(param.device) if cuda else f"cpu ({param.device})"
        self.set_latency({"device": device, "batch_size": batch_size, "member_ms": member_ms})
        return self.latency

    def set_latency(self, table: dict[str, Any]) -> None:
        member_ms = table["member_ms"]
        if [len(r) for r in member_ms] != [m.num_exits for m in self.members]:
            raise UserError("latency table does not match this EANN's members and exits; "
                            "measure it again with measure_latency()")
        schedule_ms, spent = [], 0.0
        for j in range(len(self.members)):
            for e in (e for e in self.schedule if e.member == j):
                schedule_ms.append(spent + member_ms[j][e.exit - 1])
            if self.last_exit[j]:
                spent += member_ms[j][self.last_exit[j] - 1]
        self.latency = {**table, "schedule_ms": schedule_ms}
