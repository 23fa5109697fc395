"""The one exception type for mistakes a user can make.

Every error a user can cause (a bad flag, a missing file, a malformed JSONL line)
is raised as `GptkitError` with one sentence naming what was wrong and what was
expected. The CLI prints that sentence and exits with status 2; the server turns
it into a 400. Anything else is a bug and keeps its traceback.
"""


class GptkitError(ValueError):
    """A user-facing error: its message is one clear sentence."""
