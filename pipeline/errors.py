"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint).

The CLI prints its message on one line and exits with code 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""
