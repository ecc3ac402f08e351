"""The exception types for mistakes a user can fix (bad config, missing data, bad checkpoint).

Every entry point (`cli_main`) prints their message on one line and exits with their
`exit_code`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers. A distinct exit code, so that a
    requeue wrapper does not retry a run that would only diverge again."""

    exit_code = 3


def cli_main(main: Callable[P, int]) -> Callable[P, int]:
    """Every entry point's `main` (`python -m pipeline`, the launchers): a UserError becomes one
    line on stderr, `error: <message>`, and its exit_code as main's return value, for
    `sys.exit(main())`; anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code

    return wrapper
