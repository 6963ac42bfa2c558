"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

import errno


class MinidiffError(Exception):
    """An error caused by the user's input; its message names the problem and the fix."""


class DataError(MinidiffError):
    """A dataset file is missing, unreadable, truncated, corrupt or of the wrong kind."""


class CheckpointError(MinidiffError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def os_error_message(e: OSError) -> str:
    """The one line for a failed file operation (disk full, permission denied, ...): the file,
    the reason and the fix."""
    where = f"{e.filename}: " if e.filename else ""
    fix = ("free some disk space and run the command again (a training run continues with "
           "--resume)" if e.errno == errno.ENOSPC else "check the path and its permissions")
    return f"{where}{e.strerror or e}; {fix}"
