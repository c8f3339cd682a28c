"""``trime-train``: ``fairseq-train`` with trime registered, also in spawned workers.

It adds ``--user-dir <trime package dir>`` (unless given) so that every process that
fairseq spawns for distributed training imports and registers trime itself.
"""

import sys

from trime.plugin import PLUGIN_DIR, register


def with_user_dir(argv: list) -> list:
    """``argv`` with ``--user-dir`` pointing at trime, unless the user already set one."""
    if any(arg == "--user-dir" or arg.startswith("--user-dir=") for arg in argv):
        return list(argv)
    return ["--user-dir", PLUGIN_DIR, *argv]


def cli_main() -> None:
    sys.argv = [sys.argv[0], *with_user_dir(sys.argv[1:])]
    from fairseq_cli.train import cli_main as fairseq_train

    register()
    fairseq_train()


if __name__ == "__main__":
    cli_main()
