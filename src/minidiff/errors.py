"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MinidiffError(Exception):
    """An error caused by the user's input; its message names the problem and the fix."""


class DataError(MinidiffError):
    """A dataset file is missing, unreadable, truncated, corrupt or of the wrong kind."""


class CheckpointError(MinidiffError):
    """A checkpoint is missing, corrupt, or does not match its config."""
