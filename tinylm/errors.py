"""The one exception type tinylm raises for problems a user can fix.

The command line turns a `UserError` into a single `error: ...` line and a non-zero exit code; anything
else that escapes is a bug in tinylm and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, bad configuration or a missing file: the message says what and how to fix it."""
