"""The model and window flags that ``trime-eval`` and ``trime-build-datastore`` share, declared once.

:func:`add_model_args` declares them; :func:`model_from_args` loads the model (any
:mod:`trime.adapters` front-end), its window settings and batch size from them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trime.cli import NONNEGATIVE_INT, POSITIVE_INT

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from trime.adapters import ModelAdapter, WindowSettings


def add_model_args(
    parser: argparse.ArgumentParser,
    *,
    gen_subset: str,
    gen_subset_help: str,
    required: bool = True,
) -> None:
    """Declare the model and window flags shared by ``trime-eval`` and ``trime-build-datastore``.

    ``DATA``, ``--path``, ``--gguf-file``, ``--trust-checkpoint``, ``--gen-subset``, ``--context-window``,
    ``--tokens-per-sample``, ``--key-module``, ``--fp16``/``--bf16``, ``--cpu``, ``--max-tokens``,
    ``--batch-size`` and ``--no-progress-bar``. Only ``--gen-subset`` differs per tool (trime-eval reports
    ``test``, trime-build-datastore extracts ``train``). ``required=False`` makes ``DATA``
    and ``--path`` optional (trime-build-datastore's ``--merge``/``--build-index``/``--verify``
    need no model; the tool checks them itself).
    """
    parser.add_argument(
        "data",
        nargs=None if required else "?",
        help="fairseq data-bin (trime-prepare, fairseq-preprocess), or for a Hugging Face --path a folder of "
        "text splits (train.txt/valid.txt/test.txt or wiki.SPLIT.tokens)",
    )
    parser.add_argument(
        "--path",
        required=required,
        help="fairseq checkpoint, Hugging Face model dir (with config.json), hub name or .gguf file; its last-FFN "
        "inputs are the keys",
    )
    parser.add_argument(
        "--gguf-file", default=None, metavar="NAME", help="HF models: load the GGUF file NAME inside the dir --path"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="fairseq checkpoints: load one that holds Python objects besides weights, such as the original TRIME "
        "code's (fairseq 0.9 pickles its args); unpickling such a file can run code, so only for files from a source "
        "you trust",
    )
    parser.add_argument("--gen-subset", default=gen_subset, help=gen_subset_help)
    parser.add_argument(
        "--context-window",
        type=NONNEGATIVE_INT,
        default=None,
        help="tokens of context before each window's scored tokens (also trime-eval's local memory); the same "
        "for the datastore and the evaluation (default: half of --tokens-per-sample)",
    )
    parser.add_argument(
        "--tokens-per-sample",
        type=POSITIVE_INT,
        default=None,
        help="window length incl. context (default: the window the checkpoint was trained with, else its "
        "positions up to 1024)",
    )
    parser.add_argument(
        "--key-module", default=None, help="HF models: module whose input are the keys (default: last layer's "
        "MLP; lm_head: the head's input, the final normed hidden state)"
    )
    parser.add_argument("--cpu", action="store_true", help="run the model on the CPU even if a GPU is present")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="run the model in fp16 (log-probs stay fp32; trime-build-datastore stores keys as --key-dtype)"
    )
    precision.add_argument(
        "--bf16", action="store_true", help="run the model in bf16 (log-probs stay fp32; trime-build-datastore stores keys as --key-dtype)"
    )
    parser.add_argument("--max-tokens", type=POSITIVE_INT, default=None, help="tokens per batch incl. context (default 8192)")
    parser.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="windows per batch (overrides --max-tokens; must be equal for all shards of a datastore)",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bars on stderr")


@dataclass
class LoadedModel:
    """What :func:`model_from_args` loads: the adapter, its windows, batch size and precision name."""

    lm: ModelAdapter
    windows: WindowSettings
    batch_size: int
    precision: str


def precision_of(args: argparse.Namespace) -> str:
    """``fp16``, ``bf16`` or ``fp32`` from ``--fp16``/``--bf16``."""
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    """Load the model of :func:`add_model_args`'s flags and its window settings and batch size."""
    from trime.adapters import batch_size_for, load_adapter

    precision = precision_of(args)
    lm = load_adapter(args.path, args.data, cpu=args.cpu, precision=precision, key_module=args.key_module,
                      gguf_file=args.gguf_file, trust_checkpoint=args.trust_checkpoint)
    windows = lm.window_settings(args.context_window, args.tokens_per_sample)
    return LoadedModel(lm, windows, batch_size_for(windows, args.batch_size, args.max_tokens), precision)
