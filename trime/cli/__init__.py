"""One command-line style for every trime console script.

Rules every console script follows:

- its parser is :class:`Parser`, built by a function named ``build_parser()``; a usage error
  (unknown flag, bad value, missing argument) is one stderr line,
  ``trime: error: <argparse's message, naming the flag> (see PROG --help)``, and exit status 2;
  bad input found later is one ``trime: error:`` line and exit status 1 (:func:`trime.errors.fail`);
- its entry point is ``main(argv: Sequence[str] | None = None) -> int``;
- every flag has help text;
- library functions report through a ``log`` callable; only the CLI's callables
  (:func:`logger`) add the ``PROG:`` prefix and pick stdout or stderr.

``trime-eval`` and ``trime-build-datastore`` run a model over windows of a split the same
way: :mod:`trime.cli.model_args` declares those flags once and loads the model from them. It
lives apart because it loads models (both front-ends); this module imports neither, so that
every command, ``trime-hf-train`` included, can use the parser without pulling in fairseq.
"""

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``trime: error:`` line naming the flag, exit status 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"trime: error: {message} (see {self.prog} --help)\n")


def logger(prog: str, stderr: bool = False) -> Callable[[str], None]:
    """A ``log`` callable that prints ``PROG: message`` to stdout (or stderr), flushed.

    The stream is looked up at every call, so redirected output (tests, in-process runs) is honoured.
    """

    def log(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr if stderr else sys.stdout, flush=True)

    return log


def silent(message: str) -> None:
    """A ``log`` callable that prints nothing (the default of library functions)."""
