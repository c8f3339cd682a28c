"""What trime adds to plain fairseq commands once it is registered as their plugin.

Two things, both installed by :func:`trime.plugin.register`:

* The deprecation warnings that fairseq 0.12 triggers in current hydra and torch
  (``hydra.experimental.initialize() is no longer experimental``, ``version_base``,
  ``# @package _group_``, schema matching, ``strict`` flag, ``torch.cuda.amp.autocast``,
  mismatched attention masks), and torch's ``pin_memory`` notice on a CPU-only machine,
  are silenced: they are noise to a user and used to bury trime's one-line errors under
  25-64 lines.
* ``fairseq.options.parse_args_and_arch``, called on the command line (no explicit
  argument list), checks the data-bin of a *training* run that
  uses a trime component (task ``trime_lm``, a ``trime_*`` criterion or one of trime's
  archs) before fairseq opens it, so that ``fairseq-train MISSING_DIR --criterion
  trime_loss`` or an empty train split is one line, as with ``trime-train``. Runs that use
  no trime component behave exactly as stock fairseq.
"""

import functools
import warnings
from argparse import Namespace

from trime.databin import check_data_paths

KNOWN_DEPRECATIONS = (
    r"hydra\.experimental\.\w+\(\) is no longer experimental",
    r"The version_base parameter is not specified",
    r"In '\w+': Usage of deprecated keyword in package header",
    r"'\w+' is validated against ConfigStore schema",
    r"The strict flag in the compose API is deprecated",
    r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated",
    r"Support for mismatched key_padding_mask and attn_mask is deprecated",
    r"'pin_memory' argument is set as true but no accelerator is found",  # fairseq's DataLoader on a CPU machine
)
TRIME_ARCHS = ("transformer_lm_wiki103_150M", "transformer_lm_enwik8")
TRIME_TASKS = ("trime_lm",)


def silence_known_deprecations() -> None:
    """Ignore exactly the deprecation warnings listed in :data:`KNOWN_DEPRECATIONS` (idempotent)."""
    for pattern in KNOWN_DEPRECATIONS:
        # several of these messages start with a newline; filterwarnings matches at the start
        warnings.filterwarnings("ignore", message=r"\s*" + pattern)


def uses_trime(args: Namespace) -> bool:
    """Whether parsed fairseq arguments name a trime task, criterion or arch."""
    return (
        getattr(args, "task", None) in TRIME_TASKS
        or str(getattr(args, "criterion", "") or "").startswith("trime_")
        or getattr(args, "arch", None) in TRIME_ARCHS
    )


def check_training_inputs(args: Namespace) -> None:
    """Fail with one line if the data-bin of a training run is missing, or lacks a non-empty train/valid split."""
    data = getattr(args, "data", None)
    if not data:
        return
    valid = [] if getattr(args, "disable_validation", False) else str(getattr(args, "valid_subset", "valid")).split(",")
    check_data_paths(data, [getattr(args, "train_subset", "train")], [s for s in valid if s])


def _is_training(args: Namespace) -> bool:
    """fairseq's training parser (fairseq-train) adds the checkpoint options; eval/validate parsers do not."""
    return hasattr(args, "save_dir") and hasattr(args, "train_subset")


def guard_option_parsing() -> None:
    """Wrap ``fairseq.options.parse_args_and_arch`` with :func:`check_training_inputs` for trime runs (once)."""
    from fairseq import options

    parse = options.parse_args_and_arch
    if getattr(parse, "_trime_guarded", False):
        return

    @functools.wraps(parse)
    def parse_and_check(parser, input_args=None, *args, **kwargs):
        result = parse(parser, input_args, *args, **kwargs)
        parsed = result[0] if isinstance(result, tuple) else result
        from_command_line = input_args is None  # library callers (tests, benchmarks) pass their own argv
        if from_command_line and isinstance(parsed, Namespace) and _is_training(parsed) and uses_trime(parsed):
            check_training_inputs(parsed)
        return result

    parse_and_check._trime_guarded = True
    options.parse_args_and_arch = parse_and_check
