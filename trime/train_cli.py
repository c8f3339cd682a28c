"""``trime-train``: ``fairseq-train`` with trime registered, also in spawned workers.

It adds ``--user-dir <trime package dir>`` (unless given) so that every process that
fairseq spawns for distributed training imports and registers trime itself, and it
checks the data directory and its train/valid splits up front so that a wrong path or an
empty split is a one-line error.
"""

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

from trime.fairseq_guard import check_training_inputs
from trime.plugin import PLUGIN_DIR, register


def with_user_dir(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--user-dir`` pointing at trime, unless the user already set one."""
    if any(arg == "--user-dir" or arg.startswith("--user-dir=") for arg in argv):
        return list(argv)
    return ["--user-dir", PLUGIN_DIR, *argv]


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence fairseq/hydra import chatter so that an input error stays one line."""
    logging.disable(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-train``: fairseq-train on ``argv`` (default: the command line); returns 0.

    fairseq's own parser reads ``sys.argv``: it is set to ``argv`` (with ``--user-dir``) for the
    run and restored afterwards. Usage errors are fairseq's (its parser, exit status 2).
    """
    saved = sys.argv
    sys.argv = [saved[0], *with_user_dir(saved[1:] if argv is None else argv)]
    try:
        with quiet_imports():
            from fairseq import options
            from fairseq_cli.train import cli_main as fairseq_train

            register()
            args, _ = options.parse_args_and_arch(options.get_training_parser(), sys.argv[1:], parse_known=True)
            check_training_inputs(args)  # also for runs that use no trime component
        fairseq_train()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
