"""User errors: problems the user fixes, reported as one line.

A `UserError` (a config key, a data row, a checkpoint or model directory, a layout the model does not
allow, a setup step) ends a command with `popo <command>: error: <message>` on the console, exit status
2, and its traceback only in the log file. Anything else is an internal error and keeps its traceback.
The message names the file, line or key and says what to do.

Ranks started by `launch.run_local` report a user error to the parent through a file: the first rank
to see one writes ERROR_FILE in the directory the parent gave it (the others, which often fail the same
way a moment later, find it taken), then exits with USER_ERROR_EXIT.
"""

from __future__ import annotations

import os
from pathlib import Path

USER_ERROR_EXIT = 2
ERROR_FILE = "user_error"


class UserError(ValueError):
    """A problem in what the user gave us (a value, in the widest sense); the message says where and what
    to do."""


def record_user_error(directory: Path, exc: UserError) -> bool:
    """Write `exc`'s message to DIRECTORY/ERROR_FILE unless another rank did first; True if this one did."""
    try:
        fd = os.open(Path(directory) / ERROR_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(str(exc))
    return True


def recorded_user_error(directory: Path) -> UserError | None:
    path = Path(directory) / ERROR_FILE
    return UserError(path.read_text(encoding="utf-8")) if path.is_file() else None
