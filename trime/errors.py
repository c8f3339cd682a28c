"""User-facing errors: one line, no traceback, non-zero exit.

``TrimeError`` derives from ``SystemExit`` so that any command-line entry point
(ours or fairseq's) prints just ``trime: error: <message>`` to stderr and exits with status 1,
while library callers can still catch it explicitly.
"""

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
