"""The one error type for user mistakes.

Anything a user can fix (a bad config key, a missing file, mismatched line counts) raises `MTError` with a
message that names the file, line or key. `mt.cli` catches it and prints it as a single line; a traceback is
shown only with `--debug`.
"""


class MTError(Exception):
    """A user-facing error: its message is printed as one line, without a traceback."""
