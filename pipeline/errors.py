"""The exception types for mistakes a user can fix (bad config, missing data, bad checkpoint).

The CLI prints their message on one line and exits with their `exit_code`; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers. A distinct exit code, so that a
    requeue wrapper does not retry a run that would only diverge again."""

    exit_code = 3
