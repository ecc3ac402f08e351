"""The EANN schedule (SPEC section 3) and its measured cost ratio, from numbers alone.

Members run in order of cost; every exit of every member is a candidate, taken in that order. A
candidate is emitted only when its validation error is lower than that of the last emitted one,
so error never rises with cost. A member runs only up to its last emitted exit (a member with
none is skipped), so the cost of an emitted output is what was really computed before it: every
earlier member up to its own last emitted exit, plus this member up to this exit (exit costs are
cumulative and include the earlier heads that `forward(x, until=k)` evaluates). That is at most
the SPEC's "every member already completed" cost, and equal to it when each member's final exit
is emitted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ScheduleEntry:
    member: int  # 0-based, in run order
    exit: int  # 1-based exit of that member
    macs: int  # EANN cost: cumulative multiply-adds per image when this output exists
    member_macs: int  # the same exit's cost when its member runs alone
    top1_error: float  # validation error (%) of this exit
    top5_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def build_schedule(member_macs: list[list[int]], top1: list[list[float]],
                   top5: list[list[float]]) -> list[ScheduleEntry]:
    """`member_macs[j][k]`, `top1[j][k]`: cumulative cost and validation error of member j's exit
    k + 1, members already in run order."""
    chosen: list[list[int]] = []  # per member: emitted exits (0-based)
    best = math.inf
    for errors in top1:
        emitted = []
        for k, error in enumerate(errors):
            if error < best:
                emitted.append(k)
                best = error
        chosen.append(emitted)
    entries = []
    spent = 0  # cost of the members already run, each up to its last emitted exit
    for j, emitted in enumerate(chosen):
        for k in emitted:
            entries.append(ScheduleEntry(j, k + 1, spent + member_macs[j][k], member_macs[j][k],
                                         top1[j][k], top5[j][k]))
        if emitted:
            spent += member_macs[j][emitted[-1]]
    return entries


def cost_ratios(entries: list[ScheduleEntry], member_macs: list[list[int]],
                top1: list[list[float]]) -> list[dict]:
    """For every emitted output: the cheapest single-member exit whose validation error is at
    most the output's, and C = EANN cost / that exit's cost (>= 1, since the emitted exit itself
    qualifies at its own member-alone cost)."""
    candidates = [(macs, error, j, k + 1)
                  for j, (costs, errors) in enumerate(zip(member_macs, top1))
                  for k, (macs, error) in enumerate(zip(costs, errors))]
    rows = []
    for e in entries:
        macs, _, j, k = min(c for c in candidates if c[1] <= e.top1_error)
        rows.append({"member": e.member, "exit": e.exit, "eann_macs": e.macs,
                     "top1_error": e.top1_error, "single_macs": macs, "single_member": j,
                     "single_exit": k, "C": e.macs / macs})
    return rows


def single_member_frontier(member_macs: list[list[int]],
                           top1: list[list[float]]) -> list[tuple[int, float]]:
    """The best error any single member exit reaches within each cost: (cost, error) points
    where the running minimum of the error, over all exits sorted by cost, improves."""
    points = sorted((m, e) for costs, errors in zip(member_macs, top1)
                    for m, e in zip(costs, errors))
    frontier: list[tuple[int, float]] = []
    for macs, error in points:
        if not frontier or error < frontier[-1][1]:
            frontier.append((macs, error))
    return frontier


def depth_ratio(member_macs: list[list[int]]) -> float:
    """b: the geometric mean growth of the members' full costs from one member to the next."""
    full = [costs[-1] for costs in member_macs]
    if len(full) < 2:
        return math.nan
    return (full[-1] / full[0]) ** (1 / (len(full) - 1))


def seed_bound(b: float) -> float:
    """The seed's sup_B C = 2 + 1/(b - 1) for members growing by a factor b > 1."""
    return 2 + 1 / (b - 1) if b > 1 else math.inf
