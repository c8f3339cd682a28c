"""``trime-train``: ``fairseq-train`` with trime registered, also in spawned workers.

It adds ``--user-dir <trime package dir>`` (unless given) so that every process that
fairseq spawns for distributed training imports and registers trime itself, and it
checks up front, each as a one-line error: the data directory and its train/valid splits
(a wrong path, an empty split), and the numeric flags of :data:`NUMBER_RULES` (trime's own
and fairseq's that would crash mid-run or train silently wrong on NaN, inf, zero or a
negative value). A fault of the file system while training (a full disk, a read-only
``--save-dir``) is one line too, and fairseq's half-written ``*.pt.tmp`` checkpoints are removed.
"""

import contextlib
import logging
import shutil
import sys
import tempfile
import warnings
from argparse import Namespace
from collections.abc import Iterator, Sequence
from pathlib import Path

from trime.cli import NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, UNIT_FLOAT, Number
from trime.errors import TrimeError, file_faults_as_errors
from trime.fairseq_guard import check_training_inputs, silence_known_deprecations
from trime.io_utils import atomic_path
from trime.plugin import PLUGIN_DIR, register

# parsed attribute -> rule, for flags whose value fairseq takes unchecked; None values (unset) pass
NUMBER_RULES: dict[str, Number] = {
    # trime's components
    "ce_warmup_epoch": NONNEGATIVE_INT,
    "memory_block_size": POSITIVE_INT,
    "train_mem_size": POSITIVE_INT,
    "cross_sent_ratio": UNIT_FLOAT,
    # fairseq's
    "max_tokens": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "tokens_per_sample": POSITIVE_INT,
    "update_freq": POSITIVE_INT,
    "max_update": NONNEGATIVE_INT,
    "max_epoch": NONNEGATIVE_INT,
    "lr": POSITIVE_FLOAT,
    "clip_norm": NONNEGATIVE_FLOAT,
    "weight_decay": NONNEGATIVE_FLOAT,
    "adam_eps": POSITIVE_FLOAT,
    "dropout": UNIT_FLOAT,
    "attention_dropout": UNIT_FLOAT,
    "activation_dropout": UNIT_FLOAT,
    "save_interval": POSITIVE_INT,
    "log_interval": POSITIVE_INT,
    "validate_interval": POSITIVE_INT,
    "save_interval_updates": NONNEGATIVE_INT,
    "warmup_updates": NONNEGATIVE_INT,
}


def check_numbers(args: Namespace) -> None:
    """Check every flag of :data:`NUMBER_RULES` that ``args`` holds (each item of a list flag such as ``--lr``)."""
    for name, rule in NUMBER_RULES.items():
        value = getattr(args, name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                rule.check("--" + name.replace("_", "-"), item)


def check_save_dir(args: Namespace) -> None:
    """Create ``--save-dir`` and write a probe file in it: a read-only or forbidden folder fails before training."""
    if getattr(args, "no_save", False) or not getattr(args, "save_dir", None):
        return
    with file_faults_as_errors(f"--save-dir {args.save_dir}"):
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.save_dir) as probe:
            probe.write(b"probe")


class _NoTracebacks(logging.Filter):
    """Drops the traceback fairseq logs when a checkpoint save fails: the fault is reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Traceback (most recent call last)")


@contextlib.contextmanager
def atomic_checkpoint_copies() -> Iterator[None]:
    """Inside, fairseq's copies of a saved checkpoint (``checkpoint_last.pt``, ``checkpoint_best.pt``) to
    local paths are written beside their target and renamed into place: a full disk never leaves a
    half-written ``checkpoint_last.pt`` behind, nor destroys the previous one."""
    from fairseq.file_io import PathManager

    copy = PathManager.copy

    def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in str(dst_path) or (not overwrite and Path(dst_path).exists()):
            return copy(src_path, dst_path, overwrite=overwrite)
        with atomic_path(dst_path) as tmp:
            try:
                shutil.copyfile(src_path, tmp)
            except OSError as exc:  # shutil names the source: the fault is in writing the copy
                raise OSError(exc.errno, exc.strerror, str(dst_path)) from exc
        return True

    PathManager.copy = staticmethod(atomic_copy)
    try:
        yield
    finally:
        PathManager.copy = staticmethod(copy)


def remove_partial_checkpoints(save_dir: str) -> None:
    """Delete fairseq's temporary ``*.pt.tmp`` checkpoints (half-written when a save failed)."""
    for tmp in Path(save_dir).glob("*.pt.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def file_faults_while_training(save_dir: str) -> Iterator[None]:
    """Inside, a file-system fault is one line naming ``--save-dir`` (fairseq's own traceback log of a failed
    save is dropped), checkpoint copies are atomic, and a failed save leaves no ``*.pt.tmp`` behind."""
    saver_log = logging.getLogger("fairseq.checkpoint_utils")
    no_tracebacks = _NoTracebacks()
    saver_log.addFilter(no_tracebacks)
    try:
        with file_faults_as_errors(f"--save-dir {save_dir}"), atomic_checkpoint_copies():
            yield
    except TrimeError:
        remove_partial_checkpoints(save_dir)
        raise
    finally:
        saver_log.removeFilter(no_tracebacks)


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
    A file-system fault (full disk, read-only folder) while training is one ``trime: error:`` line.
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
            check_numbers(args)
        check_save_dir(args)
        silence_known_deprecations()  # again: quiet_imports restored the warning filters of register()
        with file_faults_while_training(getattr(args, "save_dir", "checkpoints")):
            fairseq_train()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
