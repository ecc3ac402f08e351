"""Static loss-weight schemes B_1..B_L for anytime networks (SPEC section 2).

Exits are numbered 1..L in the SPEC; the returned lists are 0-based, so ``B[-1]`` is the final exit.
Pure python on purpose: reports and plots need the weights without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import SCHEMES
from pipeline.errors import UserError


def _const(num_exits: int, opt_exit: int) -> list[float]:
    return [1.0] * num_exits


def _linear(num_exits: int, opt_exit: int) -> list[float]:
    if num_exits == 1:
        return [1.0]
    return [0.25 + 0.75 * i / (num_exits - 1) for i in range(num_exits)]


def _half_end(num_exits: int, opt_exit: int) -> list[float]:
    if num_exits == 1:
        return [1.0]
    return [1.0 / (num_exits - 1)] * (num_exits - 1) + [1.0]


def _opt(num_exits: int, opt_exit: int) -> list[float]:
    k = opt_exit or num_exits
    return [1.0 if i == k else 0.0 for i in range(1, num_exits + 1)]


def _sieve(num_exits: int, opt_exit: int) -> list[float]:
    units = [0] * (num_exits + 1)  # 1-based; units[0] unused
    d = 2
    while True:
        for k in range(1, d):
            # floor(k*L/d + 0.5) in integers, so exact halves always round up.
            r = (2 * k * num_exits + d) // (2 * d)
            if 1 <= r <= num_exits:
                units[r] += 1
        if all(units[1:num_exits]):  # vacuously true for L=1
            break
        d *= 2
    total = sum(units[1:num_exits])
    return [u / total for u in units[1:num_exits]] + [1.0]


def _sieve_orig(num_exits: int, opt_exit: int) -> list[float]:
    steps = []
    step = 1
    while step < num_exits:
        steps.append(step)
        step *= 2
    units = [sum(1 for s in steps if (num_exits - i) % s == 0) for i in range(1, num_exits)]
    final = sum(units)
    if final == 0:  # L=1: no other exit to sum, the final exit alone carries the loss
        return [1.0]
    return [u / final for u in units] + [1.0]


_SCHEME_FNS: dict[str, Callable[[int, int], list[float]]] = {
    "const": _const,
    "linear": _linear,
    "half_end": _half_end,
    "opt": _opt,
    "sieve": _sieve,
    "sieve_orig": _sieve_orig,
    # AdaLoss starts from CONST; its adaptive updates live in AnytimeLoss.
    "adaloss": _const,
}


def static_weights(scheme: str, num_exits: int, opt_exit: int = 0) -> list[float]:
    """Return B_1..B_L for ``scheme`` with ``num_exits`` exits.

    ``opt_exit`` is the 1-based exit of the "opt" scheme; 0 means the final exit. It is ignored by
    the other schemes but still range-checked so a typo in a config fails early.
    """
    if scheme not in SCHEMES:  # a user's value is checked with its config key (LossConfig)
        raise ValueError(f"unknown loss weight scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")
    if not isinstance(num_exits, int) or num_exits < 1:
        raise UserError(f"num_exits must be a positive integer, got {num_exits!r}")
    if not isinstance(opt_exit, int) or not 0 <= opt_exit <= num_exits:
        raise UserError(f"loss.opt_exit={opt_exit!r} is not an exit of this model's {num_exits}; "
                        f"use 1 to {num_exits} (0 = the final exit)")
    return _SCHEME_FNS[scheme](num_exits, opt_exit)
