"""The model-adapter interface that datastore building, evaluation memories and tuning talk to.

An adapter is a causal LM loaded for scoring (:class:`ModelAdapter`). It cuts a split
into scoring windows (:class:`SplitWindows`) and runs the forward pass of one batch of
windows, returning a :class:`WindowBatch`: the token head's terms of every scored
position (log Z_t p(y) and log Z_t, in fp32) and the TRIME keys (the last layer's FFN
input) of every position. Everything above the adapter (memories, FAISS, tuning, the
CLIs) sees only these types, so one code path serves fairseq and Hugging Face models.

Windows: ``tokens_per_sample`` tokens per window of which up to ``context_window`` are
earlier tokens (context); only the new tokens are scored. Context positions are memory
keys labelled with their true next tokens. Batches are fixed runs of ``batch_size``
consecutive windows, so a window's numbers do not depend on where a run or a datastore
shard starts (``first_batch``/``end_batch``). Defaults (:func:`default_window_settings`): the
window the model was trained with, else its positions up to DEFAULT_WINDOW (a CPU-sane 1,024),
and half of it as context, so that windows overlap as in the papers' evaluations (their
WikiText-103 runs keep 2,560 of 3,072 tokens as context; half costs two forward passes per
scored token instead of six).

Where a scored token comes from: every adapter reads a split as one token stream
(:meth:`ModelAdapter.stream`), and a window's scored tokens are a run of it
(:meth:`SplitWindows.target_positions`), so a datastore row can name the position of its
target token. :meth:`ModelAdapter.documents` cuts a stream into documents by one of DOCUMENT_RULES:
``heading`` (WikiText articles, each starting at its `` = Title = `` heading line, :func:`heading_title`),
``file`` (the whole file), ``blocks`` (runs of non-blank lines, each starting after one or more blank lines,
titled by :func:`block_title`), or ``auto`` (headings where the split has any, else the file).
:meth:`ModelAdapter.decode` turns token ids back into text.

Generation (:mod:`trime.eval.generation`) extends a stream token by token: :meth:`ModelAdapter.encode`
tokenizes a prompt, :meth:`ModelAdapter.window_head` gives the input in front of it as an evaluation
window would hold it, and :meth:`ModelAdapter.start_decoding` an :class:`IncrementalDecoder` that keeps
the model's KV cache and returns each new position's key and the token head's terms over the whole
vocabulary (:class:`DecoderStep`), the same numbers :meth:`ModelAdapter.forward` gives at the targets.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trime.errors import fail

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest (rows x vocabulary) block of fp32 token logits held at once.
TOKEN_LOGIT_BUDGET = 1 << 26
DEFAULT_MAX_TOKENS = 8192
# the default window of a model whose training window is unknown: its positions, at most this many tokens
DEFAULT_WINDOW = 1024


@dataclass
class WindowSettings:
    """``tokens_per_sample`` = context + new tokens of a full window (as in fairseq-eval-lm)."""

    tokens_per_sample: int
    context_window: int

    @property
    def new_tokens(self) -> int:
        return self.tokens_per_sample - self.context_window

    def as_dict(self) -> dict:
        return {
            "tokens_per_sample": self.tokens_per_sample,
            "context_window": self.context_window,
            "new_tokens_per_window": self.new_tokens,
        }

    def describe(self) -> str:
        """``windows of T tokens, C of them context (N new)``."""
        return (f"windows of {self.tokens_per_sample:,} tokens, {self.context_window:,} of them context "
                f"({self.new_tokens:,} new)")


# how a split is cut into documents (ModelAdapter.documents); "auto": headings where there are any, else the file
DOCUMENT_RULES = ("auto", "heading", "file", "blocks")
# a block's title is its first non-blank line, stripped, at most this many characters
BLOCK_TITLE_CHARS = 80


@dataclass
class Documents:
    """The documents of one token stream: ``starts[i]`` is the position of document i's first token.

    ``starts`` is increasing and begins with 0 (the documents tile the stream); ``by`` is the rule
    that found them (never ``"auto"``): ``"heading"`` (WikiText article headings), ``"blocks"``
    (blank-line-separated blocks) or ``"file"`` (one document).
    """

    starts: list[int]
    titles: list[str]
    by: str

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0 or len(self.starts) != len(self.titles):
            raise ValueError("documents must start at position 0 and have one title each")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError("document starts must increase")


def heading_title(words: list[str]) -> str | None:
    """The title of a WikiText article heading line (`` = Title = ``, one ``=`` on each side), else None.

    ``words`` is the line split on whitespace; section headings (``= = Section = =``) are not articles.
    """
    if len(words) < 3 or words[0] != "=" or words[-1] != "=" or words[1] == "=" or words[-2] == "=":
        return None
    return " ".join(words[1:-1])


def block_title(line: str) -> str:
    """The title of a block of lines from its first non-blank line: stripped, cut to BLOCK_TITLE_CHARS characters
    (and stripped again where the cut ends in whitespace)."""
    return line.strip()[:BLOCK_TITLE_CHARS].rstrip()


def check_document_rule(rule: str) -> str:
    """``rule`` if it is one of DOCUMENT_RULES, else a one-line error naming ``--documents``."""
    if rule not in DOCUMENT_RULES:
        fail(f"--documents must be one of {', '.join(DOCUMENT_RULES)}; got {rule!r}")
    return rule


def no_headings(path: Path) -> None:
    """The one-line error of ``--documents heading`` on a split without article headings."""
    fail(f"--documents heading: {path} has no WikiText article heading line (' = Title = '); "
         "use --documents blocks or file, or auto to fall back to one document per file")


@dataclass
class WindowBatch:
    """One forward pass over a batch of windows (everything detached).

    Positions are (B, T); *scored* positions are the new tokens (from ``starts[b]`` on,
    with a target), flattened row-major into N query rows.
    """

    ids: list[int]  # window ids (consecutive ids = consecutive windows of the split)
    reps: Tensor  # (B, T, d) last-FFN inputs of every position, model dtype
    key_labels: Tensor  # (B, T) next-token label of every position (any value where none)
    key_valid: Tensor  # (B, T) position has a real token and a label
    scored: Tensor  # (B, T) position is scored
    starts: list[int]  # first scored position of each window
    targets: Tensor  # (N,) targets of the scored positions
    token_score: Tensor  # (N,) fp32 log(Z_t p_tok(y))
    token_logz: Tensor  # (N,) fp32 log Z_t

    @property
    def queries(self) -> Tensor:
        return self.reps[self.scored]

    @property
    def num_scored(self) -> int:
        return int(self.targets.numel())

    def scored_per_window(self) -> list[int]:
        return self.scored.sum(dim=1).tolist()

    def to(self, device: torch.device) -> "WindowBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return WindowBatch(**moved)


class SplitWindows(ABC):
    """A split cut into scoring windows; batches are runs of consecutive windows."""

    settings: WindowSettings

    @abstractmethod
    def __len__(self) -> int:
        """Number of windows."""

    @abstractmethod
    def scored_counts(self) -> np.ndarray:
        """(windows,) int64: tokens scored by each window (datastore rows per window)."""

    @abstractmethod
    def batches(self, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[object]:
        """Model inputs of batches ``first_batch .. end_batch-1``, in order, for :meth:`ModelAdapter.forward`.

        Starting mid-split gives exactly the batches of a run from the start.
        """

    @abstractmethod
    def target_positions(self, first_window: int, end_window: int) -> np.ndarray:
        """(rows,) int64: the stream positions (:meth:`ModelAdapter.stream`) of the targets that windows
        ``first_window .. end_window-1`` score, in the order of their rows (:attr:`WindowBatch.targets`)."""

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


class ModelAdapter(ABC):
    """A causal LM ready for scoring, plus what identifies it for mismatch checks.

    Attributes set by every implementation:
        frontend: ``"fairseq"`` or ``"hf"``.
        path: the checkpoint file or model directory; data_dir: the data it scores.
        device, dtype: where and in which precision the weights live.
        dim: size of the TRIME keys.
        identity: file identity of the weights (:func:`trime.io_utils.file_identity` style;
            :func:`trime.io_utils.identity_key` compares two).
        vocab: ``{"sha256", "size"}`` of the vocabulary (fairseq ``dict.txt`` or HF tokenizer);
            a datastore's values are ids in it.
        architecture: model type/arch name; key_source: the module whose input are the keys.
            A datastore from another architecture or key source is refused.
    """

    frontend: str
    path: Path
    data_dir: Path
    device: torch.device
    dtype: torch.dtype
    dim: int
    identity: dict
    vocab: dict
    architecture: str
    key_source: str

    @property
    def dict_sha256(self) -> str:
        """sha256 of the vocabulary (what a datastore's ``dictionary.sha256`` must equal)."""
        return self.vocab["sha256"]

    @abstractmethod
    def window_settings(self, context_window: int | None, tokens_per_sample: int | None) -> WindowSettings:
        """Resolve ``--context-window``/``--tokens-per-sample`` (None: :func:`default_window_settings`) and check them."""

    @abstractmethod
    def windows(self, split: str, settings: WindowSettings) -> SplitWindows:
        """The split ``split`` of :attr:`data_dir` as scoring windows."""

    @abstractmethod
    def forward(self, batch: object, need_token_terms: bool = True) -> WindowBatch:
        """Run the model on one batch from :meth:`SplitWindows.batches` (no gradients)."""

    @abstractmethod
    def data_files(self, split: str) -> list[Path]:
        """The files the split's tokens are read from (their sha256 identify the data); the first holds them."""

    @abstractmethod
    def stream(self, split: str) -> np.ndarray:
        """The split's token ids in order, 1-D and read-only (often a memory map: slice it, do not copy it)."""

    @abstractmethod
    def documents(self, split: str, rule: str = "auto") -> Documents:
        """The split's documents by ``rule`` (one of DOCUMENT_RULES; :attr:`Documents.by` is the rule used).

        ``heading``: WikiText articles by their heading lines (a one-line error where the split has none); text
        before the first heading belongs to the first article when it is only whitespace, else it is a document
        titled by the file's name. ``file``: one document titled by the file's name. ``blocks``: a document starts
        at the first token of each run of non-blank lines that follows one or more blank (empty or whitespace-only)
        lines; blank lines before the first block belong to it; titles by :func:`block_title`; a split without a
        non-blank line is one document titled by the file's name. ``auto``: ``heading`` where the split has
        headings, else ``file``.
        """

    @abstractmethod
    def decode(self, ids: "np.ndarray | list[int]") -> str:
        """The text of token ids of the stream (a newline where the data has one)."""

    # ---- generation (trime.eval.generation): the stream extended token by token

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The token ids of a prompt: ``text`` tokenized as the split files' text is, with no end-of-line token."""

    @abstractmethod
    def encode_file(self, path: Path, option: str) -> np.ndarray:
        """The token stream of a text file read before a prompt, tokenized as a split's file is (``option`` names
        the flag in errors)."""

    @abstractmethod
    def stream_windows(self, stream: np.ndarray, settings: WindowSettings) -> SplitWindows:
        """Token ids ``stream`` cut into scoring windows exactly as :meth:`windows` cuts a split's stream."""

    @abstractmethod
    def window_head(self, before: np.ndarray, settings: WindowSettings) -> list[int]:
        """The model input in front of the token that follows ``before`` in a window whose first new token it is:
        the window's context and the input that predicts that token (empty where nothing does: the first token of
        an HF stream). Input position i predicts input i+1, so all but the last position are context rows, whose
        targets are the last ``len - 1`` tokens of ``before``."""

    @abstractmethod
    def start_decoding(self) -> "IncrementalDecoder":
        """An incremental decoder of one row with an empty KV cache."""

    @abstractmethod
    def stop_tokens(self) -> list[int]:
        """The token ids that end a generated text (end of sequence, or fairseq's end of line)."""

    def never_generated(self) -> list[int]:
        """Token ids that are not text and are never generated (fairseq's padding)."""
        return []

    @abstractmethod
    def max_input_tokens(self) -> int | None:
        """How many positions one input may have (None: no limit known)."""


@dataclass
class DecoderStep:
    """What :meth:`IncrementalDecoder.feed` computes: the keys of the new positions and the token head's terms
    of the next token after the last of them."""

    reps: Tensor  # (B, n, d) keys (the last FFN's input) of the n new positions, model dtype
    token_scores: Tensor  # (B, V) fp32 log(Z_t p_tok(w)) of every token w (the head's logits for a plain softmax)
    token_logz: Tensor  # (B,) fp32 log Z_t


class IncrementalDecoder(ABC):
    """A model reading B growing inputs with its KV cache (HF ``past_key_values``, fairseq ``incremental_state``):
    each position is computed once, however long the input grows."""

    @abstractmethod
    def feed(self, tokens: Tensor) -> DecoderStep:
        """Append ``tokens`` (B, n) to the inputs and run the model on them only."""

    @abstractmethod
    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` (B',) of the inputs and cache, in this order; a row may repeat (beam search)."""


def pick_device(cpu: bool) -> torch.device:
    """cuda:0 when a GPU is present and ``--cpu`` is not given, else the CPU."""
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def default_window_settings(
    context_window: int | None, tokens_per_sample: int | None, trained_window: int | None, max_positions: int | None
) -> tuple[int, int]:
    """(context_window, tokens_per_sample) with each None replaced by its default.

    ``tokens_per_sample``: the window the model was trained with (``trained_window``), else its
    positions (``max_positions``) up to DEFAULT_WINDOW. ``context_window``: half the window.
    """
    tps = tokens_per_sample
    if tps is None:
        tps = trained_window if trained_window is not None else min(max_positions or DEFAULT_WINDOW, DEFAULT_WINDOW)
    return (tps // 2 if context_window is None else context_window), int(tps)


def window_defaults_note(settings: WindowSettings, context_window: int | None, tokens_per_sample: int | None) -> str | None:
    """The windows and the flags they took defaults for (None when ``--context-window`` and
    ``--tokens-per-sample`` were both given): what the tools print."""
    defaults = [flag for flag, value in (("--tokens-per-sample", tokens_per_sample),
                                         ("--context-window", context_window)) if value is None]
    return f"{settings.describe()} (default {' and '.join(defaults)})" if defaults else None


def check_window_settings(
    context_window: int, tokens_per_sample: int, max_positions: int | None, longest_window: int | None = None
) -> WindowSettings:
    """One-line errors for windows that cannot work; ``longest_window`` defaults to ``tokens_per_sample``."""
    tps = tokens_per_sample
    if context_window < 0:
        fail(f"--context-window must be >= 0, got {context_window}")
    if tps - context_window < 1:
        fail(
            f"--context-window {context_window} leaves no new tokens in a window of {tps} "
            f"(--tokens-per-sample); use a context window below {tps}"
        )
    longest = tps if longest_window is None else longest_window
    if max_positions is not None and longest > max_positions:
        fail(f"--tokens-per-sample {tps} exceeds the model's {max_positions} positions; use at most {max_positions}")
    return WindowSettings(tokens_per_sample=tps, context_window=context_window)


def batch_size_for(settings: WindowSettings, batch_size: int | None, max_tokens: int | None) -> int:
    """Windows per batch: ``--batch-size``, else ``--max-tokens`` // window length (at least 1)."""
    if batch_size is not None:
        if batch_size < 1:
            fail(f"--batch-size must be >= 1, got {batch_size}")
        return batch_size
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    return max(1, (max_tokens or DEFAULT_MAX_TOKENS) // settings.tokens_per_sample)


def token_terms_in_blocks(head, features: Tensor, targets: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(log Z_t p(y), log Z_t) in fp32 for feature rows, in blocks that bound the logits' memory.

    ``head(features, targets)`` returns the two terms of one block.
    """
    rows = max(1, TOKEN_LOGIT_BUDGET // max(1, vocab_size))
    scores, logzs = [], []
    for lo in range(0, features.shape[0], rows):
        score, logz = head(features[lo : lo + rows], targets[lo : lo + rows])
        scores.append(score.float())
        logzs.append(logz.float())
    if not scores:
        empty = features.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(scores), torch.cat(logzs)
