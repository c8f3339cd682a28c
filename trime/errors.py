"""User-facing errors: one line, no traceback, non-zero exit.

Faults of the file system (a full disk, a quota, a read-only or missing folder, permissions)
are user-facing too: :func:`file_faults_as_errors` turns them into the same one line, naming
the file, around a command's body.

``TrimeError`` derives from ``SystemExit`` so that any command-line entry point
(ours or fairseq's) prints just ``trime: error: <message>`` to stderr and exits with status 1,
while library callers can still catch it explicitly.
"""

import contextlib
import errno
from collections.abc import Iterator
from typing import NoReturn


class TrimeError(SystemExit):
    """A clear, one-line error about bad input: names the file or flag and the fix."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"trime: error: {message}")

    def __str__(self) -> str:
        return f"trime: error: {self.message}"


def fail(message: str) -> NoReturn:
    """Raise :class:`TrimeError` with ``message``."""
    raise TrimeError(message)


# file-system faults the user can fix: errno -> what to do
_FILE_FAULT_FIXES = {
    errno.ENOSPC: "free space there or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "pass a file, not a folder",
}


@contextlib.contextmanager
def file_faults_as_errors(what: str = "") -> Iterator[None]:
    """Inside, an OSError the user can fix (full disk, quota, read-only, permissions, missing path)
    becomes one ``trime: error:`` line naming the file (or ``what``) and the fix."""
    try:
        yield
    except OSError as exc:
        fix = _FILE_FAULT_FIXES.get(exc.errno)
        if fix is None:
            raise
        where = exc.filename or what or "a file"
        fail(f"{exc.strerror or 'I/O error'} writing or reading {where}: {fix}")
