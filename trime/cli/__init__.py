"""One command-line style for every trime console script.

Rules every console script follows:

- its parser is :class:`Parser`, built by a function named ``build_parser()``; a usage error
  (unknown flag, bad value, missing argument) is one stderr line,
  ``trime: error: <argparse's message, naming the flag> (see PROG --help)``, and exit status 2;
  bad input found later is one ``trime: error:`` line and exit status 1 (:func:`trime.errors.fail`);
- its entry point is ``main(argv: Sequence[str] | None = None) -> int``;
- every flag has help text;
- every numeric flag is checked once, by a :class:`Number` rule used as its argparse ``type``;
  a value that arrives another way (a ``--sweep`` list, a config or record file) goes through
  the same rule's :meth:`Number.check`, so NaN, inf and out-of-range values fail alike;
- library functions report through a ``log`` callable; only the CLI's callables
  (:func:`logger`) add the ``PROG:`` prefix and pick stdout or stderr.

``trime-eval`` and ``trime-build-datastore`` run a model over windows of a split the same
way: :mod:`trime.cli.model_args` declares those flags once and loads the model from them. It
lives apart because it loads models (both front-ends); this module imports neither, so that
every command, ``trime-hf-train`` included, can use the parser without pulling in fairseq.
"""

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn, Optional, Union

from trime.errors import fail


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


class Number:
    """A numeric flag's rule: its type (int or float), finiteness and bounds, checked wherever a value comes from.

    Use an instance as argparse's ``type=`` (a bad value is a usage error naming the flag), and
    :meth:`check` for values given another way (one ``trime: error:`` line naming ``flag``).
    Floats must be finite: NaN and inf are refused by every rule.
    """

    def __init__(self, kind: type = float, gt: Optional[float] = None, ge: Optional[float] = None,
                 lt: Optional[float] = None, le: Optional[float] = None) -> None:
        self.kind, self.gt, self.ge, self.lt, self.le = kind, gt, ge, lt, le
        def shown(bound: float) -> str:
            return str(int(bound)) if kind is int else f"{bound:g}"

        bounds = [f"> {shown(gt)}" if gt is not None else "", f">= {shown(ge)}" if ge is not None else "",
                  f"< {shown(lt)}" if lt is not None else "", f"<= {shown(le)}" if le is not None else ""]
        noun = "an integer" if kind is int else "a finite number"
        self.description = " ".join([noun] + [b for b in bounds if b])
        self.__name__ = self.description  # argparse names the type in some messages

    def problem(self, value: Union[int, float]) -> Optional[str]:
        """Why ``value`` breaks the rule, or None when it is acceptable."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.description}, got {value!r}"
        if self.kind is int and (isinstance(value, float) and not value.is_integer()):
            return f"must be {self.description}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.description}, got {value!r}"
        broken = ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                  or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le))
        return f"must be {self.description}, got {value:g}" if broken else None

    def __call__(self, text: str) -> Union[int, float]:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.description}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def check(self, flag: str, value: Union[int, float]) -> Union[int, float]:
        """``value`` if it keeps the rule; otherwise fail with one line naming ``flag``."""
        problem = self.problem(value)
        if problem:
            fail(f"{flag} {problem}")
        return self.kind(value)


# the common rules; define a new Number where a flag needs other bounds
POSITIVE_INT = Number(int, ge=1)
NONNEGATIVE_INT = Number(int, ge=0)
FINITE_FLOAT = Number(float)
POSITIVE_FLOAT = Number(float, gt=0)
NONNEGATIVE_FLOAT = Number(float, ge=0)
UNIT_FLOAT = Number(float, ge=0, le=1)
