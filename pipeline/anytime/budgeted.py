"""Budgeted batch evaluation (MSDNet's "dynamic" setting): a batch of images must be classified
within an average cost; easy images leave at an early exit, hard ones go on.

A cascade is a sequence of candidate outputs (the exits of one network, or the outputs an EANN
emits), each with the cumulative cost of reaching it. An image leaves at the first candidate whose
confidence (top softmax probability) reaches that candidate's threshold; the last candidate takes
everything left. Thresholds follow MSDNet: the fraction of images leaving at candidate k is
proportional to q**k, and each threshold is the confidence that lets exactly that many of the
still-running held-out images leave. q is bisected until the held-out average cost meets the
target; the thresholds are then scored on images they were not chosen on.

    curve = budgeted_curve(confidence, correct, costs, points=8)   # confidence, correct: [N, K]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class CascadeResult:
    target_cost: float  # the average cost asked for (per image)
    thresholds: list[float]  # one per candidate; the last is -inf (takes every image left)
    fit_cost: float  # average cost on the images the thresholds were chosen on
    cost: float  # average cost on the held-out scoring images
    error: float  # top-1 error (%) on the scoring images
    exit_fractions: list[float]  # fraction of scoring images leaving at each candidate

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [t if math.isfinite(t) else None for t in self.thresholds]
        return d


def thresholds_for(confidence: torch.Tensor, q: float) -> list[float]:
    """MSDNet's thresholds: candidate k takes a share of the images proportional to q**k."""
    n, k_count = confidence.shape
    shares = torch.tensor([q**k for k in range(1, k_count + 1)], dtype=torch.float64)
    shares /= shares.sum()
    running = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(k_count - 1):
        want = int(round(float(shares[k]) * n))
        candidates = confidence[running, k]
        if want <= 0 or candidates.numel() == 0:
            thresholds.append(math.inf)
            continue
        take = min(want, candidates.numel())
        threshold = float(candidates.topk(take).values[-1])
        thresholds.append(threshold)
        running &= confidence[:, k] < threshold
    thresholds.append(-math.inf)
    return thresholds


def apply_cascade(confidence: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The candidate (0-based) each image leaves at."""
    passes = confidence >= torch.tensor(thresholds, dtype=confidence.dtype)
    passes[:, -1] = True
    return passes.int().argmax(dim=1)  # the first True


def fit_thresholds(confidence: torch.Tensor, costs: list[float],
                   target_cost: float) -> tuple[list[float], float]:
    """Thresholds whose average cost on these images is as close to `target_cost` as q allows;
    returns (thresholds, achieved average cost)."""
    cost_of = torch.tensor(costs, dtype=torch.float64)

    def average_cost(log_q: float) -> tuple[list[float], float]:
        t = thresholds_for(confidence, math.exp(log_q))
        return t, float(cost_of[apply_cascade(confidence, t)].mean())

    lo, hi = -12.0, 12.0  # q from ~6e-6 (all leave first) to ~1.6e5 (all go to the last)
    best = average_cost(lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        t, c = average_cost(mid)
        if abs(c - target_cost) < abs(best[1] - target_cost):
            best = (t, c)
        if c < target_cost:
            lo = mid
        else:
            hi = mid
    return best


def budgeted_curve(confidence: torch.Tensor, correct: torch.Tensor, costs: list[float],
                   points: int = 8) -> list[CascadeResult]:
    """Error against average cost for `points` target costs spread between the first and the
    last candidate's cost. Images alternate between choosing thresholds (even positions) and
    scoring them (odd positions), so no threshold is judged on the images it was fit on."""
    if confidence.shape != correct.shape or confidence.shape[1] != len(costs):
        raise ValueError(f"confidence {tuple(confidence.shape)}, correct "
                         f"{tuple(correct.shape)} and {len(costs)} costs do not match")
    if confidence.shape[0] < 2:
        raise ValueError("budgeted evaluation needs at least 2 images")
    fit_conf = confidence[0::2]
    score_conf, score_correct = confidence[1::2], correct[1::2]
    cost_of = torch.tensor(costs, dtype=torch.float64)
    lo, hi = min(costs), max(costs)
    results = []
    for i in range(points):
        target = lo + (hi - lo) * i / max(points - 1, 1)
        thresholds, fit_cost = fit_thresholds(fit_conf, costs, target)
        leave = apply_cascade(score_conf, thresholds)
        hits = score_correct.gather(1, leave[:, None]).squeeze(1)
        fractions = torch.bincount(leave, minlength=len(costs)).double() / len(leave)
        results.append(CascadeResult(
            target_cost=target, thresholds=thresholds, fit_cost=fit_cost,
            cost=float(cost_of[leave].mean()), error=100.0 * (1 - float(hits.double().mean())),
            exit_fractions=fractions.tolist()))
    return results
